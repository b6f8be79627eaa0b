package main

import (
	"strings"
	"testing"

	"tailscale.com/ipn"
)

func strp(s string) *string { return &s }

// tsnet falls back to TS_CONTROL_URL when a node's ControlURL is empty: the
// bridge never leaves it empty.
func TestControlURLIsAlwaysExplicit(t *testing.T) {
	t.Setenv("TS_CONTROL_URL", "http://127.0.0.1:1")
	n := newNode(nodeConfig{Hostname: "n", StateDir: t.TempDir()})
	if n.srv.ControlURL != ipn.DefaultControlURL {
		t.Fatalf("ControlURL %q, want %q", n.srv.ControlURL, ipn.DefaultControlURL)
	}
	n = newNode(nodeConfig{Hostname: "n", StateDir: t.TempDir(), ControlURL: strp("http://127.0.0.1:9")})
	if n.srv.ControlURL != "http://127.0.0.1:9" {
		t.Fatalf("ControlURL %q", n.srv.ControlURL)
	}
}

// A node without an auth key is refused while tsnet would take one from the
// environment, even a blank one; a node with a key is not.
func TestKeyFallbackRefused(t *testing.T) {
	for _, v := range []string{"TS_AUTHKEY", "TS_AUTH_KEY"} {
		t.Run(v, func(t *testing.T) {
			t.Setenv(v, "   ")
			cfg := nodeConfig{Hostname: "n", StateDir: "/tmp/x"}
			err := cfg.validate()
			if err == nil || !strings.Contains(err.Error(), v) {
				t.Fatalf("validate() = %v, want an error naming %s", err, v)
			}
			cfg.AuthKey = strp("tskey-auth-x")
			if err := cfg.validate(); err != nil {
				t.Fatalf("with a key: %v", err)
			}
		})
	}
}

// A loopback-control node needs its knobs in the start environment; the
// bridge names the missing ones rather than setting them.
func TestLoopbackKnobsChecked(t *testing.T) {
	for _, k := range loopbackKnobs {
		t.Setenv(k, "")
	}
	t.Setenv("TS_ASSUME_NETWORK_UP_FOR_TEST", "true")
	cfg := nodeConfig{Hostname: "n", StateDir: "/tmp/x", AuthKey: strp("k"), ControlURL: strp("http://127.0.0.1:5")}
	err := cfg.validate()
	if err == nil || !strings.Contains(err.Error(), "TS_DISABLE_PORTMAPPER=true") ||
		strings.Contains(err.Error(), "TS_ASSUME_NETWORK_UP_FOR_TEST=true") {
		t.Fatalf("validate() = %v", err)
	}
	for _, k := range loopbackKnobs {
		t.Setenv(k, "true")
	}
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	// Not needed for any other control server.
	for _, k := range loopbackKnobs {
		t.Setenv(k, "")
	}
	cfg.ControlURL = strp("https://headscale.example.com")
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
}

// Timeouts too large for a Go duration mean no limit, not an instant
// deadline.
func TestHugeTimeoutsMeanNoLimit(t *testing.T) {
	ctx, cancel := timeoutCtx(1<<63 - 1)
	defer cancel()
	if _, ok := ctx.Deadline(); ok {
		t.Fatal("a deadline for the largest timeout")
	}
	ctx2, cancel2 := timeoutCtx(1000)
	defer cancel2()
	if _, ok := ctx2.Deadline(); !ok {
		t.Fatal("no deadline for 1 s")
	}
}
