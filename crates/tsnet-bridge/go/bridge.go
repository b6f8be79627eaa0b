// Command tsnetbridge is tailkitd's bridge over tailscale.com/tsnet. It is
// built with `go build -buildmode=c-archive` and linked into the Rust daemon;
// tsnetbridge.h is the ABI.
//
// Every Go object lives behind an integer handle, connections cross as
// close-on-exec file descriptors that arrive in one message together with the
// peer's address, and no panic crosses into C.
package main

/*
#include "tsnetbridge.h"
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"tailscale.com/client/local"
	"tailscale.com/hostinfo"
	"tailscale.com/ipn"
	"tailscale.com/tsnet"
	"tailscale.com/util/dnsname"
)

// main is required by -buildmode=c-archive and never called.
func main() {}

func init() {
	hostinfo.SetApp("tailkitd")
}

// Handles. One counter for every kind of object, so a handle of one kind is
// never valid as another; handles are never reused.
var (
	handlesMu  sync.Mutex
	lastHandle int64
	nodes      = map[int64]*node{}
	listeners  = map[int64]*bridgeListener{}
)

// newHandleLocked returns a fresh handle. handlesMu must be held.
func newHandleLocked() int64 {
	lastHandle++
	return lastHandle
}

func lookupNode(h C.int64_t) (*node, error) {
	handlesMu.Lock()
	defer handlesMu.Unlock()
	n, ok := nodes[int64(h)]
	if !ok {
		return nil, codedErrorf(C.TSNB_EBADF, "no such node (handle %d): closed or never created", int64(h))
	}
	return n, nil
}

// codedError carries one of the TSNB_E* codes across the boundary.
type codedError struct {
	code C.int
	msg  string
}

func (e *codedError) Error() string { return e.msg }

func codedErrorf(code C.int, format string, args ...any) error {
	return &codedError{code: code, msg: fmt.Sprintf(format, args...)}
}

// fail writes err's message into errbuf and returns its code.
func fail(err error, errbuf *C.char, errlen C.size_t) C.int {
	code := C.int(C.TSNB_EIO)
	var ce *codedError
	if errors.As(err, &ce) {
		code = ce.code
	}
	writeCString(errbuf, errlen, err.Error())
	return code
}

// guard turns a panic in an export into TSNB_EPANIC. Use as
// `defer guard(&rc, errbuf, errlen)` with a named result rc.
func guard(rc *C.int, errbuf *C.char, errlen C.size_t) {
	if r := recover(); r != nil {
		writeCString(errbuf, errlen, fmt.Sprintf("tsnetbridge: recovered panic: %v", r))
		*rc = C.TSNB_EPANIC
	}
}

// writeCString copies s into the caller's buffer, truncating, always
// NUL-terminating when n > 0.
func writeCString(buf *C.char, n C.size_t, s string) {
	if buf == nil || n == 0 {
		return
	}
	dst := unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(n))
	k := copy(dst[:len(dst)-1], s)
	dst[k] = 0
}

// writeJSON marshals v into the caller's buffer, or returns TSNB_ERANGE with
// the size needed.
func writeJSON(v any, out *C.char, outlen C.size_t, needed *C.size_t) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if needed != nil {
		*needed = C.size_t(len(b) + 1)
	}
	if out == nil || int(outlen) < len(b)+1 {
		return codedErrorf(C.TSNB_ERANGE, "output buffer of %d bytes is too small: %d needed", int(outlen), len(b)+1)
	}
	dst := unsafe.Slice((*byte)(unsafe.Pointer(out)), int(outlen))
	copy(dst, b)
	dst[len(b)] = 0
	return nil
}

// maxTimeoutMS is the largest timeout in milliseconds a time.Duration
// holds; a larger one means no limit.
const maxTimeoutMS = int64(math.MaxInt64 / int64(time.Millisecond))

// timeoutCtx is a context with a timeout of ms milliseconds; none when ms
// is zero or negative, or too large for a time.Duration.
func timeoutCtx(ms C.int64_t) (context.Context, context.CancelFunc) {
	if ms <= 0 || int64(ms) > maxTimeoutMS {
		return context.WithCancel(context.Background())
	}
	return context.WithTimeout(context.Background(), time.Duration(ms)*time.Millisecond)
}

// callCtx is timeoutCtx(ms), also cancelled when n starts closing.
func (n *node) callCtx(ms C.int64_t) (context.Context, context.CancelFunc) {
	ctx, cancel := timeoutCtx(ms)
	stop := context.AfterFunc(n.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// msString formats a timeout in milliseconds for a message.
func msString(ms C.int64_t) string {
	if ms <= 0 || int64(ms) > maxTimeoutMS {
		return "no limit"
	}
	return (time.Duration(ms) * time.Millisecond).String()
}

// nodeConfig is the JSON the Rust side passes to tsnetbridge_node_new.
type nodeConfig struct {
	Hostname   string  `json:"hostname"`
	StateDir   string  `json:"state_dir"`
	AuthKey    *string `json:"auth_key"`
	ControlURL *string `json:"control_url"`
	Ephemeral  bool    `json:"ephemeral"`
	UploadLogs bool    `json:"upload_logs"`
	// BackendLogs forwards tsnet's verbose backend log (magicsock, netstack,
	// control client); off, those lines are discarded in Go.
	BackendLogs bool `json:"backend_logs"`
}

func (c *nodeConfig) validate() error {
	if err := dnsname.ValidLabel(c.Hostname); err != nil {
		return codedErrorf(C.TSNB_EINVAL, "invalid hostname %q: %v", c.Hostname, err)
	}
	if c.StateDir == "" {
		return codedErrorf(C.TSNB_EINVAL, "state dir must not be empty")
	}
	if c.ControlURL != nil && *c.ControlURL != "" {
		u, err := url.Parse(*c.ControlURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return codedErrorf(C.TSNB_EINVAL, "invalid control URL %q: want http(s)://host[:port]", *c.ControlURL)
		}
	}
	return c.checkEnvironment()
}

func (c *nodeConfig) controlURLForHumans() string {
	if c.ControlURL != nil && *c.ControlURL != "" {
		return *c.ControlURL
	}
	return "Tailscale's default control server"
}

// node is one tsnet.Server plus the bookkeeping the bridge needs.
type node struct {
	cfg nodeConfig
	srv *tsnet.Server

	startDone chan struct{} // closed when Start has returned (or will never run)
	startErr  error         // valid once startDone is closed

	// ctx is cancelled when the node starts closing: calls still waiting
	// on it (up, dial, whois) return at once rather than holding up the
	// close (tsnet's Close waits up to 5 s for LocalAPI streams such as
	// up's IPN bus watch).
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	kicked bool // Start was launched (or abandoned because of close)
	closed bool
	lns    map[int64]*bridgeListener

	reportedAuthURL string // the login URL up last returned
}

var errNodeClosed = codedErrorf(C.TSNB_EBADF, "node is closed")

func newNode(cfg nodeConfig) *node {
	n := &node{cfg: cfg, startDone: make(chan struct{}), lns: map[int64]*bridgeListener{}}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	src := "node/" + cfg.Hostname
	n.srv = &tsnet.Server{
		Dir:       cfg.StateDir,
		Hostname:  cfg.Hostname,
		Ephemeral: cfg.Ephemeral,
		UserLogf:  logfFor(src + "/user"),
	}
	if cfg.BackendLogs {
		n.srv.Logf = logfFor(src + "/backend")
	}
	if cfg.AuthKey != nil {
		n.srv.AuthKey = *cfg.AuthKey
	}
	// Always explicit: an empty ControlURL would make tsnet take
	// TS_CONTROL_URL from the environment.
	n.srv.ControlURL = ipn.DefaultControlURL
	if cfg.ControlURL != nil && *cfg.ControlURL != "" {
		n.srv.ControlURL = *cfg.ControlURL
	}
	return n
}

func (c *nodeConfig) controlIsLoopback() bool {
	if c.ControlURL == nil || *c.ControlURL == "" {
		return false
	}
	u, err := url.Parse(*c.ControlURL)
	if err != nil {
		return false
	}
	host := u.Hostname()
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// kickStart launches tsnet's Start once, in the background, and returns a
// channel closed when it has returned.
func (n *node) kickStart() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.kicked {
		return n.startDone
	}
	n.kicked = true
	if n.closed {
		n.startErr = errNodeClosed
		close(n.startDone)
		return n.startDone
	}
	go func() {
		defer close(n.startDone)
		defer func() {
			if r := recover(); r != nil {
				n.startErr = fmt.Errorf("tsnet start panicked: %v", r)
			}
		}()
		applyStartPolicy(&n.cfg)
		n.startErr = n.srv.Start()
	}()
	return n.startDone
}

// start starts the node if needed and waits for Start to return.
func (n *node) start(ctx context.Context) error {
	select {
	case <-n.kickStart():
		return n.startErr
	case <-ctx.Done():
		if n.ctx.Err() != nil {
			return errNodeClosed
		}
		return codedErrorf(C.TSNB_ETIMEDOUT, "timed out starting node %q", n.cfg.Hostname)
	}
}

// running reports whether Start has returned successfully.
func (n *node) running() bool {
	select {
	case <-n.startDone:
		return n.startErr == nil
	default:
		return false
	}
}

func (n *node) localClient(ctx context.Context) (*local.Client, error) {
	if err := n.start(ctx); err != nil {
		return nil, err
	}
	return n.srv.LocalClient()
}

// noteAuthURL records a login URL and reports whether it is new.
func (n *node) noteAuthURL(u string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.reportedAuthURL == u {
		return false
	}
	n.reportedAuthURL = u
	return true
}

// up waits for state Running; see tsnetbridge_node_up.
func (n *node) up(ctx context.Context, timeout string) error {
	lc, err := n.localClient(ctx)
	if err != nil {
		return err
	}
	state := ipn.NoState
	timedOut := func() error {
		if n.ctx.Err() != nil {
			return codedErrorf(C.TSNB_EBADF, "node %q was closed while waiting to come up", n.cfg.Hostname)
		}
		msg := fmt.Sprintf("node %q did not come up within %s (backend state %v; control server %s)",
			n.cfg.Hostname, timeout, state, n.cfg.controlURLForHumans())
		hctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if st, err := lc.StatusWithoutPeers(hctx); err == nil && len(st.Health) > 0 {
			msg += ": " + strings.Join(st.Health, "; ")
		}
		return codedErrorf(C.TSNB_ETIMEDOUT, "%s", msg)
	}
	watcher, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialState)
	if err != nil {
		if ctx.Err() != nil {
			return timedOut()
		}
		return err
	}
	defer watcher.Close()
	for {
		nt, err := watcher.Next()
		if err != nil {
			if ctx.Err() != nil {
				return timedOut()
			}
			return fmt.Errorf("watching node %q: %w", n.cfg.Hostname, err)
		}
		if nt.ErrMessage != nil {
			return fmt.Errorf("node %q: backend error: %s (control server %s)", n.cfg.Hostname, *nt.ErrMessage, n.cfg.controlURLForHumans())
		}
		if nt.State != nil {
			state = *nt.State
		}
		switch state {
		case ipn.Running:
			// The netmap with our addresses precedes Running; wait briefly
			// in the unlikely case it does not.
			for {
				if v4, v6 := n.srv.TailscaleIPs(); v4.IsValid() || v6.IsValid() {
					return nil
				}
				select {
				case <-ctx.Done():
					return timedOut()
				case <-time.After(50 * time.Millisecond):
				}
			}
		case ipn.NeedsLogin:
			authURL := ""
			if nt.BrowseToURL != nil {
				authURL = *nt.BrowseToURL
			}
			if authURL == "" {
				if st, err := lc.StatusWithoutPeers(ctx); err == nil {
					authURL = st.AuthURL
				}
			}
			// Each login URL is reported once: a later up waits for the
			// login to complete (or for a new URL).
			if authURL != "" && n.noteAuthURL(authURL) {
				return &codedError{code: C.TSNB_ENEEDSLOGIN, msg: authURL}
			}
		}
	}
}

type statusJSON struct {
	BackendState string   `json:"backend_state"`
	AuthURL      string   `json:"auth_url"`
	DNSName      string   `json:"dns_name"`
	IPs          []string `json:"ips"`
	UserLogin    string   `json:"user_login"`
	Hostname     string   `json:"hostname"`
	Health       []string `json:"health"`
}

func (n *node) status(ctx context.Context) (*statusJSON, error) {
	out := &statusJSON{BackendState: ipn.NoState.String(), IPs: []string{}, Hostname: n.cfg.Hostname, Health: []string{}}
	if !n.running() {
		return out, nil
	}
	lc, err := n.srv.LocalClient()
	if err != nil {
		return nil, err
	}
	st, err := lc.StatusWithoutPeers(ctx)
	if err != nil {
		return nil, err
	}
	out.BackendState = st.BackendState
	out.AuthURL = st.AuthURL
	if st.Health != nil {
		out.Health = st.Health
	}
	for _, ip := range st.TailscaleIPs {
		out.IPs = append(out.IPs, ip.String())
	}
	if st.Self != nil {
		out.DNSName = strings.TrimSuffix(st.Self.DNSName, ".")
		if u, ok := st.User[st.Self.UserID]; ok {
			out.UserLogin = u.LoginName
		}
	}
	return out, nil
}

func (n *node) ips() []string {
	ips := []string{}
	if !n.running() {
		return ips
	}
	v4, v6 := n.srv.TailscaleIPs()
	for _, ip := range []netip.Addr{v4, v6} {
		if ip.IsValid() {
			ips = append(ips, ip.String())
		}
	}
	return ips
}

func (n *node) close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return errNodeClosed
	}
	n.closed = true
	n.cancel()
	if !n.kicked {
		n.kicked = true
		n.startErr = errNodeClosed
		close(n.startDone)
	}
	lns := make([]*bridgeListener, 0, len(n.lns))
	for _, bl := range n.lns {
		lns = append(lns, bl)
	}
	n.mu.Unlock()

	for _, bl := range lns {
		bl.close()
	}
	select {
	case <-n.startDone:
	case <-time.After(time.Minute):
		return fmt.Errorf("node %q: gave up waiting for tsnet to finish starting before closing it", n.cfg.Hostname)
	}
	if n.startErr != nil {
		return nil // never ran: nothing to stop
	}
	return n.srv.Close()
}

//export tsnetbridge_node_new
func tsnetbridge_node_new(configJSON *C.char, outNode *C.int64_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	var cfg nodeConfig
	if err := json.Unmarshal([]byte(C.GoString(configJSON)), &cfg); err != nil {
		return fail(codedErrorf(C.TSNB_EINVAL, "invalid node config JSON: %v", err), errbuf, errlen)
	}
	if err := cfg.validate(); err != nil {
		return fail(err, errbuf, errlen)
	}
	n := newNode(cfg)
	handlesMu.Lock()
	h := newHandleLocked()
	nodes[h] = n
	handlesMu.Unlock()
	*outNode = C.int64_t(h)
	return C.TSNB_OK
}

//export tsnetbridge_node_up
func tsnetbridge_node_up(h C.int64_t, timeoutMS C.int64_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	ctx, cancel := n.callCtx(timeoutMS)
	defer cancel()
	if err := n.up(ctx, msString(timeoutMS)); err != nil {
		return fail(err, errbuf, errlen)
	}
	return C.TSNB_OK
}

//export tsnetbridge_node_status
func tsnetbridge_node_status(h C.int64_t, out *C.char, outlen C.size_t, needed *C.size_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := n.status(ctx)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	if err := writeJSON(st, out, outlen, needed); err != nil {
		return fail(err, errbuf, errlen)
	}
	return C.TSNB_OK
}

//export tsnetbridge_node_ips
func tsnetbridge_node_ips(h C.int64_t, out *C.char, outlen C.size_t, needed *C.size_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	if err := writeJSON(n.ips(), out, outlen, needed); err != nil {
		return fail(err, errbuf, errlen)
	}
	return C.TSNB_OK
}

//export tsnetbridge_node_peers
func tsnetbridge_node_peers(h C.int64_t, out *C.char, outlen C.size_t, needed *C.size_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	if !n.running() {
		return fail(codedErrorf(C.TSNB_EINVAL, "node %q is not up", n.cfg.Hostname), errbuf, errlen)
	}
	lc, err := n.srv.LocalClient()
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := lc.Status(ctx)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	if err := writeJSON(st, out, outlen, needed); err != nil {
		return fail(err, errbuf, errlen)
	}
	return C.TSNB_OK
}

//export tsnetbridge_node_listen
func tsnetbridge_node_listen(h C.int64_t, port C.uint16_t, outListener *C.int64_t, outFD *C.int, outPort *C.uint16_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := n.start(ctx); err != nil {
		return fail(err, errbuf, errlen)
	}
	ln, err := n.srv.Listen("tcp", ":"+strconv.Itoa(int(port)))
	if err != nil {
		return fail(fmt.Errorf("listening on tailnet port %d: %w", int(port), err), errbuf, errlen)
	}
	actual := int(port)
	if _, p, err := net.SplitHostPort(ln.Addr().String()); err == nil {
		if v, err := strconv.Atoi(p); err == nil {
			actual = v
		}
	}
	bl, rustFD, err := newBridgeListener(n, ln)
	if err != nil {
		ln.Close()
		return fail(err, errbuf, errlen)
	}
	*outListener = C.int64_t(bl.h)
	*outFD = C.int(rustFD)
	*outPort = C.uint16_t(actual)
	return C.TSNB_OK
}

//export tsnetbridge_listener_close
func tsnetbridge_listener_close(h C.int64_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	handlesMu.Lock()
	bl, ok := listeners[int64(h)]
	handlesMu.Unlock()
	if !ok {
		return fail(codedErrorf(C.TSNB_EBADF, "no such listener (handle %d)", int64(h)), errbuf, errlen)
	}
	bl.close()
	return C.TSNB_OK
}

//export tsnetbridge_node_dial
func tsnetbridge_node_dial(h C.int64_t, addr *C.char, timeoutMS C.int64_t, outFD *C.int, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	target := C.GoString(addr)
	ctx, cancel := n.callCtx(timeoutMS)
	defer cancel()
	if err := n.start(ctx); err != nil {
		return fail(err, errbuf, errlen)
	}
	c, err := n.srv.Dial(ctx, "tcp", target)
	if err != nil {
		if ctx.Err() != nil {
			return fail(codedErrorf(C.TSNB_ETIMEDOUT, "dialing %s over the tailnet timed out: %v", target, err), errbuf, errlen)
		}
		return fail(fmt.Errorf("dialing %s over the tailnet: %w", target, err), errbuf, errlen)
	}
	fd, err := relayConn(c)
	if err != nil {
		c.Close()
		return fail(err, errbuf, errlen)
	}
	*outFD = C.int(fd)
	return C.TSNB_OK
}

//export tsnetbridge_node_whois
func tsnetbridge_node_whois(h C.int64_t, addr *C.char, timeoutMS C.int64_t, out *C.char, outlen C.size_t, needed *C.size_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	peer := C.GoString(addr)
	ctx, cancel := n.callCtx(timeoutMS)
	defer cancel()
	lc, err := n.localClient(ctx)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	who, err := lc.WhoIs(ctx, peer)
	if err != nil {
		if errors.Is(err, local.ErrPeerNotFound) {
			return fail(codedErrorf(C.TSNB_ENOENT, "whois %s: no tailnet peer has that address", peer), errbuf, errlen)
		}
		if ctx.Err() != nil {
			return fail(codedErrorf(C.TSNB_ETIMEDOUT, "whois %s timed out: %v", peer, err), errbuf, errlen)
		}
		return fail(fmt.Errorf("whois %s: %w", peer, err), errbuf, errlen)
	}
	if err := writeJSON(who, out, outlen, needed); err != nil {
		return fail(err, errbuf, errlen)
	}
	return C.TSNB_OK
}

//export tsnetbridge_node_loopback
func tsnetbridge_node_loopback(h C.int64_t, out *C.char, outlen C.size_t, needed *C.size_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	n, err := lookupNode(h)
	if err != nil {
		return fail(err, errbuf, errlen)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := n.start(ctx); err != nil {
		return fail(err, errbuf, errlen)
	}
	addr, proxyCred, _, err := n.srv.Loopback()
	if err != nil {
		return fail(fmt.Errorf("starting the loopback proxy: %w", err), errbuf, errlen)
	}
	res := map[string]string{"addr": addr, "socks5_user": "tsnet", "socks5_password": proxyCred}
	if err := writeJSON(res, out, outlen, needed); err != nil {
		return fail(err, errbuf, errlen)
	}
	return C.TSNB_OK
}

//export tsnetbridge_node_close
func tsnetbridge_node_close(h C.int64_t, errbuf *C.char, errlen C.size_t) (rc C.int) {
	defer guard(&rc, errbuf, errlen)
	handlesMu.Lock()
	n, ok := nodes[int64(h)]
	delete(nodes, int64(h))
	handlesMu.Unlock()
	if !ok {
		return fail(codedErrorf(C.TSNB_EBADF, "no such node (handle %d)", int64(h)), errbuf, errlen)
	}
	if err := n.close(); err != nil {
		return fail(err, errbuf, errlen)
	}
	return C.TSNB_OK
}
