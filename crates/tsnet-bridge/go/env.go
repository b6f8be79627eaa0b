package main

// The environment: what tsnet reads from it, which the bridge checks and
// never changes (no setenv while other threads may read the environment),
// process-wide switches set without it, and an exec that restores what
// the Go runtime changed in this process.

/*
#include "tsnetbridge.h"
*/
import "C"

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"unsafe"

	"tailscale.com/logtail"
)

// checkEnvironment refuses a node that tsnet would configure from the
// environment rather than from c, and a loopback-control node that lacks
// its knobs. It only reads the environment: setenv while other threads of
// the process may read it is not safe, so what a node needs must be in the
// environment the process started with.
//
// tsnet's fallbacks: TS_CONTROL_URL never acts (newNode always sets the
// control URL); TS_AUTHKEY and TS_AUTH_KEY would become the auth key of a
// node that has none, so such a node is not created while either is set.
func (c *nodeConfig) checkEnvironment() error {
	if c.AuthKey == nil || *c.AuthKey == "" {
		for _, v := range []string{"TS_AUTHKEY", "TS_AUTH_KEY"} {
			if _, set := os.LookupEnv(v); set {
				return codedErrorf(C.TSNB_EINVAL,
					"%s is set in this process's environment, and tsnet would take it as the auth key of node %q, whose settings give none: "+
						"remove it from the environment (tailkitd run does so itself)", v, c.Hostname)
			}
		}
	}
	if c.controlIsLoopback() {
		var missing []string
		for _, k := range loopbackKnobs {
			if os.Getenv(k) != "true" {
				missing = append(missing, k+"=true")
			}
		}
		if len(missing) > 0 {
			return codedErrorf(C.TSNB_EINVAL,
				"node %q has its control server on loopback (%s) and needs %s in the environment this process started with "+
					"(tsnet reads them from there; the bridge never changes the environment of a running process): "+
					"tailkitd sets them by re-executing itself, and scripts/test exports them for the tests",
				c.Hostname, *c.ControlURL, strings.Join(missing, " "))
		}
	}
	return nil
}

// loopbackKnobs are tsnet's knobs that a node on a loopback control server
// needs (LOOPBACK_CONTROL_ENV on the Rust side): assume the network is up
// (a loopback-only namespace has no interface tsnet counts as up, and it
// would pause), no port mapper (no UPnP, NAT-PMP or PCP probes of the LAN
// gateway), and no local interface addresses offered to peers as
// endpoints (peers meet on 127.0.0.1, as the local STUN server sees them,
// or through the local DERP server).
var loopbackKnobs = []string{"TS_ASSUME_NETWORK_UP_FOR_TEST", "TS_DISABLE_PORTMAPPER", "TS_DEBUG_OMIT_LOCAL_ADDRS"}

// logUploadOff records that log upload to Tailscale was turned off in this
// process (it cannot be turned back on).
var logUploadOff atomic.Bool

// applyStartPolicy sets the process-wide tsnet switches a node needs before
// it starts, without touching the environment.
//
// Log upload to Tailscale goes off unless the node opted in (logtail's own
// switch, which also covers network flow logs). Off is sticky: nodes
// started earlier keep uploading, and a later node asking for upload does
// not get it.
func applyStartPolicy(cfg *nodeConfig) {
	if !cfg.UploadLogs {
		logtail.Disable()
		logUploadOff.Store(true)
	} else if logUploadOff.Load() {
		emit("bridge", fmt.Sprintf("node %q asked to upload logs, but log upload is already off in this process", cfg.Hostname))
	}
}

// cStrings copies n C strings from p.
func cStrings(p **C.char, n C.int) []string {
	if p == nil || n <= 0 {
		return nil
	}
	out := make([]string, int(n))
	for i, s := range unsafe.Slice(p, int(n)) {
		out[i] = C.GoString(s)
	}
	return out
}

//export tsnetbridge_exec
func tsnetbridge_exec(path *C.char, argv **C.char, argc C.int, envp **C.char, envc C.int, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	// syscall.Exec sets the soft RLIMIT_NOFILE back to what the process
	// started with before execve: the Go runtime raised it at start, and
	// the new program must not take the raised value for the original.
	p := C.GoString(path)
	err := syscall.Exec(p, cStrings(argv, argc), cStrings(envp, envc))
	return fail(fmt.Errorf("exec %s: %w", p, err), errbuf, errlen)
}
