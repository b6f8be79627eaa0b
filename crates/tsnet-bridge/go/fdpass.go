package main

// Handing tailnet connections to the Rust side as file descriptors.
//
// tsnet connections live in gVisor and have no fd, so each one is relayed
// through an AF_UNIX stream socketpair: Go pumps bytes between the tailnet
// connection and one end, and the other end goes to Rust. For a listener,
// that fd travels over a SOCK_SEQPACKET socket in a single message whose
// payload is the peer's "ip:port": the address and the connection are one
// message and cannot be mismatched, however many connections are in flight
// and whatever fds the process opens or closes meanwhile.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// socketpair returns a connected AF_UNIX pair, both ends non-blocking and
// close-on-exec: Go's end wrapped for its netpoller, and the raw fd of the
// other end, which the caller hands over (or closes).
func socketpair(typ int, name string) (goEnd *net.UnixConn, otherFD int, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, -1, fmt.Errorf("socketpair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), name)
	c, err := net.FileConn(f) // dups the fd (close-on-exec)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, -1, fmt.Errorf("wrapping socketpair: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		unix.Close(fds[1])
		return nil, -1, fmt.Errorf("socketpair: unexpected conn type %T", c)
	}
	return uc, fds[1], nil
}

// relayConn pumps c through a fresh stream socketpair and returns the fd of
// the end that belongs to the caller.
func relayConn(c net.Conn) (int, error) {
	uc, fd, err := socketpair(unix.SOCK_STREAM, "tsnet-relay")
	if err != nil {
		return -1, err
	}
	go relay(c, uc)
	return fd, nil
}

type closeWriter interface{ CloseWrite() error }

// relay copies both ways between the tailnet connection tc and the local
// socket uc. End of stream in one direction becomes a half-close (FIN) in
// that direction only, so request/response protocols work; an error, or the
// Rust side closing its socket entirely, closes both.
func relay(tc net.Conn, uc *net.UnixConn) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			tc.Close()
			uc.Close()
		})
	}
	done := make(chan struct{}, 2)
	go func() { // tailnet -> local
		defer func() { done <- struct{}{} }()
		if _, err := io.Copy(uc, tc); err != nil {
			closeBoth()
			return
		}
		uc.CloseWrite()
	}()
	go func() { // local -> tailnet
		defer func() { done <- struct{}{} }()
		if _, err := io.Copy(tc, uc); err != nil || peerHungUp(uc) {
			closeBoth()
			return
		}
		cw, ok := tc.(closeWriter)
		if !ok {
			closeBoth()
			return
		}
		cw.CloseWrite()
	}()
	<-done
	<-done
	closeBoth()
}

// peerHungUp reports whether the other end of uc was closed entirely (not
// just shut down for writing): then nobody will read what the tailnet peer
// sends, and the relay should close instead of half-closing.
func peerHungUp(uc *net.UnixConn) bool {
	rc, err := uc.SyscallConn()
	if err != nil {
		return true
	}
	hup := false
	rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		if n, err := unix.Poll(pfd, 0); err == nil && n > 0 {
			hup = pfd[0].Revents&unix.POLLHUP != 0
		}
	})
	return hup
}

// bridgeListener delivers a tsnet listener's connections over a
// SOCK_SEQPACKET socket.
type bridgeListener struct {
	h    int64
	n    *node
	ln   net.Listener
	sock *net.UnixConn // Go's end; the Rust side holds the other

	closeOnce sync.Once
}

func newBridgeListener(n *node, ln net.Listener) (*bridgeListener, int, error) {
	sock, rustFD, err := socketpair(unix.SOCK_SEQPACKET, "tsnet-listener")
	if err != nil {
		return nil, -1, err
	}
	bl := &bridgeListener{n: n, ln: ln, sock: sock}

	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		sock.Close()
		unix.Close(rustFD)
		return nil, -1, errNodeClosed
	}
	handlesMu.Lock()
	bl.h = newHandleLocked()
	listeners[bl.h] = bl
	handlesMu.Unlock()
	n.lns[bl.h] = bl
	n.mu.Unlock()

	go bl.acceptLoop()
	go bl.watchPeer()
	return bl, rustFD, nil
}

func (bl *bridgeListener) close() {
	bl.closeOnce.Do(func() {
		bl.ln.Close()
		bl.sock.Close()
		handlesMu.Lock()
		delete(listeners, bl.h)
		handlesMu.Unlock()
		bl.n.mu.Lock()
		delete(bl.n.lns, bl.h)
		bl.n.mu.Unlock()
	})
}

// acceptLoop delivers connections one at a time. The send blocks once the
// Rust side stops accepting and the socket's queue is full; then no more
// connections are accepted from tsnet, which closes each further one that
// it cannot hand over within a second. So a flood of connections cannot
// pile up relays, goroutines and descriptors here.
func (bl *bridgeListener) acceptLoop() {
	defer bl.close()
	for {
		c, err := bl.ln.Accept()
		if err != nil {
			return
		}
		if !deliver(bl.sock, c) {
			return
		}
	}
}

// watchPeer closes the listener when the Rust side closes its socket (a read
// returns EOF; Rust never writes to it).
func (bl *bridgeListener) watchPeer() {
	var buf [16]byte
	for {
		if _, err := bl.sock.Read(buf[:]); err != nil {
			bl.close()
			return
		}
	}
}

// msgSender sends one message with control data: the listener's socket,
// or a stand-in in tests.
type msgSender interface {
	WriteMsgUnix(b, oob []byte, addr *net.UnixAddr) (n, oobn int, err error)
}

// sendRetryDelays are the pauses between tries of a send that failed for
// want of kernel memory or of room for in-flight fds.
var sendRetryDelays = []time.Duration{10 * time.Millisecond, 50 * time.Millisecond, 200 * time.Millisecond}

// transientSendError reports whether a failed send concerns this one
// message (the kernel is short of memory, or of room for fds in flight),
// not the socket: the listener goes on.
func transientSendError(err error) bool {
	return errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ETOOMANYREFS)
}

// deliver relays c and sends the caller's end of the relay, together with
// the peer address, as one SCM_RIGHTS message. A send that fails for a
// transient reason is tried again a few times, then that one connection is
// dropped; any other failure (the Rust side closed its socket) means the
// listener is done: deliver then returns false.
func deliver(s msgSender, c net.Conn) bool {
	peer := c.RemoteAddr().String()
	fd, err := relayConn(c)
	if err != nil {
		c.Close()
		emit("bridge", fmt.Sprintf("dropping connection from %s: %v", peer, err))
		return true
	}
	rights := unix.UnixRights(fd)
	for try := 0; ; try++ {
		_, _, err = s.WriteMsgUnix([]byte(peer), rights, nil)
		if err == nil || !transientSendError(err) || try == len(sendRetryDelays) {
			break
		}
		time.Sleep(sendRetryDelays[try])
	}
	// The message holds its own reference to the socket; ours goes. If the
	// send failed, this was the last one and the relay sees a hang-up.
	unix.Close(fd)
	switch {
	case err == nil:
		return true
	case transientSendError(err):
		emit("bridge", fmt.Sprintf("dropping connection from %s after %d tries: %v", peer, len(sendRetryDelays)+1, err))
		return true
	default:
		emit("bridge", fmt.Sprintf("listener closed, dropping connection from %s: %v", peer, err))
		return false
	}
}
