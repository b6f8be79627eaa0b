package main

import (
	"errors"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// failingSender fails its first `fails` sends with err, then succeeds.
type failingSender struct {
	mu    sync.Mutex
	err   error
	fails int
	tries int
}

func (f *failingSender) WriteMsgUnix(b, oob []byte, addr *net.UnixAddr) (int, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tries++
	if f.tries <= f.fails {
		return 0, 0, &net.OpError{Op: "write", Net: "unixpacket", Err: f.err}
	}
	return len(b), len(oob), nil
}

// pipeConn is one end of an in-memory connection with a remote address.
type pipeConn struct{ net.Conn }

func (pipeConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(100, 64, 0, 7), Port: 4000} }

// closedSoon reports whether the far end of a pipe sees its peer close
// within the hang guard.
func closedSoon(far net.Conn) bool {
	far.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := far.Read(make([]byte, 1))
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

func init() {
	// Short pauses: the test is about what happens, not how long it waits.
	sendRetryDelays = []time.Duration{time.Millisecond, time.Millisecond, time.Millisecond}
}

// A send that fails for want of memory or of room for in-flight fds is
// retried; once it succeeds, the listener goes on.
func TestDeliverRetriesTransientErrors(t *testing.T) {
	for _, errno := range []unix.Errno{unix.ENOMEM, unix.ENOBUFS, unix.ETOOMANYREFS} {
		near, _ := net.Pipe()
		s := &failingSender{err: errno, fails: 2}
		if !deliver(s, pipeConn{near}) {
			t.Fatalf("%v: the listener was closed", errno)
		}
		if s.tries != 3 {
			t.Fatalf("%v: %d tries, want 3", errno, s.tries)
		}
	}
}

// When the retries run out, that one connection is dropped (its peer sees
// it close) and the listener goes on.
func TestDeliverDropsOneConnectionOnPersistentTransientError(t *testing.T) {
	near, far := net.Pipe()
	s := &failingSender{err: unix.ETOOMANYREFS, fails: 1 << 30}
	if !deliver(s, pipeConn{near}) {
		t.Fatal("one failed send closed the listener")
	}
	if s.tries != len(sendRetryDelays)+1 {
		t.Fatalf("%d tries, want %d", s.tries, len(sendRetryDelays)+1)
	}
	if !closedSoon(far) {
		t.Fatal("the dropped connection was left open")
	}
}

// Any other failure (the Rust side is gone) ends the listener.
func TestDeliverStopsWhenTheSocketIsGone(t *testing.T) {
	near, far := net.Pipe()
	s := &failingSender{err: unix.EPIPE, fails: 1 << 30}
	if deliver(s, pipeConn{near}) {
		t.Fatal("the listener went on after EPIPE")
	}
	if s.tries != 1 {
		t.Fatalf("%d tries, want 1 (EPIPE is not retried)", s.tries)
	}
	if !closedSoon(far) {
		t.Fatal("the connection was left open")
	}
}
