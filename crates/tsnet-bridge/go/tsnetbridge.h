/*
 * tsnetbridge.h: the C ABI of tailkitd's bridge over tailscale.com/tsnet.
 *
 * The bridge is a Go package built with `go build -buildmode=c-archive` and
 * linked into the Rust daemon. This header is the contract; bridge.go includes
 * it, so the compiler checks every exported function against it.
 *
 * Conventions
 * - Objects (nodes, listeners, local tailnets) are int64 handles looked up in
 *   mutex-guarded Go maps: no Go pointer ever crosses to C. Handles are never
 *   reused within a process.
 * - Every function returns 0 on success or one of the negative TSNB_E* codes.
 *   On failure, a human-readable message is written to the caller-owned
 *   `errbuf` (truncated to errlen-1 bytes, always NUL-terminated when
 *   errlen > 0). Messages are per call, not per handle, so concurrent calls
 *   on one node never see each other's errors.
 * - Structured results are JSON, written NUL-terminated into the caller-owned
 *   `out` buffer. If `outlen` is too small the call returns TSNB_ERANGE and
 *   stores the size needed (including the NUL) in `*needed`; every call that
 *   writes JSON is idempotent, so the caller retries with a bigger buffer.
 * - Every file descriptor the bridge creates or hands over is close-on-exec.
 *   An fd returned through an out parameter (or received from a listener
 *   socket) belongs to the caller from then on.
 * - String arguments are NUL-terminated UTF-8 and only read during the call
 *   (they are not `const` because cgo cannot declare exported const params).
 * - No Go panic crosses the boundary: each export recovers and returns
 *   TSNB_EPANIC with the panic message.
 * - Calls may block (up, dial, whois, close): call them from a thread that is
 *   allowed to block.
 */
#ifndef TSNETBRIDGE_H
#define TSNETBRIDGE_H

#include <stddef.h>
#include <stdint.h>

/* Return codes (negated Linux errno values where one fits). */
#define TSNB_OK 0
#define TSNB_ENOENT (-2)       /* whois: no peer has that address */
#define TSNB_EIO (-5)          /* any other failure; see errbuf */
#define TSNB_EBADF (-9)        /* unknown or already closed handle */
#define TSNB_EINVAL (-22)      /* invalid argument or configuration */
#define TSNB_ERANGE (-34)      /* `out` too small; `*needed` holds the size */
#define TSNB_EALREADY (-114)   /* the one-shot log fd was already taken */
#define TSNB_ETIMEDOUT (-110)  /* the timeout passed; errbuf says what was awaited */
#define TSNB_ENEEDSLOGIN (-1000) /* interactive login needed; errbuf holds the URL */
#define TSNB_EPANIC (-1001)    /* a Go panic was recovered; errbuf holds it */

/*
 * Logs. Takes the read end of the pipe (O_CLOEXEC) that carries every log line
 * of the Go side: tsnet's backend and user logs of each node, Go's `log`
 * package, and the local tailnet. One line per record, '\n'-terminated:
 *   "<source>\t<message>"  where source is e.g. "node/<hostname>/backend".
 * Lines are queued in Go and dropped (with a count) when the reader lags; Go
 * never blocks on the pipe. Only the first call succeeds (TSNB_EALREADY after).
 */
int tsnetbridge_take_log_fd(int *out_fd);

/*
 * Process limits. The soft and hard RLIMIT_NOFILE this process was started
 * with: Go's runtime raises the soft limit in every process it lives in
 * before anything else runs (and remembers the original only for the
 * children Go itself starts). Always TSNB_OK unless getrlimit fails
 * (TSNB_EIO).
 */
int tsnetbridge_orig_nofile(uint64_t *out_cur, uint64_t *out_max);

/*
 * Process.
 * Replaces this program with path (execve), argv and envp being argc and envc
 * C strings. The soft RLIMIT_NOFILE is set back first to what the process
 * started with (the Go runtime raises it when it starts). Returns only on
 * failure.
 */
int tsnetbridge_exec(char *path, char **argv, int argc, char **envp, int envc,
                     char *errbuf, size_t errlen);

/*
 * Nodes.
 * config_json: {"hostname": str, "state_dir": str, "auth_key": str|null,
 *               "control_url": str|null, "ephemeral": bool, "upload_logs": bool}
 * Validates and creates a node without starting it. Log upload to Tailscale is
 * turned off (process-wide, for good; logtail's switch, not the environment)
 * before the first node whose upload_logs is false starts.
 * The environment: the bridge never changes it. tsnet's fallbacks never act:
 * an absent control_url means Tailscale's, given to tsnet explicitly (so
 * TS_CONTROL_URL is not read), and a node without auth_key is refused
 * (TSNB_EINVAL) while TS_AUTHKEY or TS_AUTH_KEY is set. A node whose control
 * URL is on loopback is refused (TSNB_EINVAL, naming them) unless
 * TS_ASSUME_NETWORK_UP_FOR_TEST, TS_DISABLE_PORTMAPPER and
 * TS_DEBUG_OMIT_LOCAL_ADDRS are "true" in the environment the process
 * started with.
 * Calls waiting on a node (up, dial, whois) return as soon as it is closed.
 * Timeouts in milliseconds: <= 0, or too large for a Go duration, is no limit.
 */
int tsnetbridge_node_new(char *config_json, int64_t *out_node, char *errbuf,
                         size_t errlen);

/*
 * Starts the node if needed and waits up to timeout_ms for state Running.
 * Returns TSNB_ENEEDSLOGIN (errbuf = login URL) as soon as the backend needs
 * interactive login and has a URL. Each URL is reported once: the node stays
 * started, and calling up again keeps waiting for the login to complete (or
 * returns TSNB_ENEEDSLOGIN again if the control server hands out a new URL).
 * TSNB_ETIMEDOUT names the last backend state and the control URL.
 */
int tsnetbridge_node_up(int64_t node, int64_t timeout_ms, char *errbuf, size_t errlen);

/*
 * Status JSON: {"backend_state": str, "auth_url": str, "dns_name": str
 * (no trailing dot), "ips": [str], "user_login": str, "hostname": str}.
 * Does not start the node (an unstarted node reports "NoState").
 */
int tsnetbridge_node_status(int64_t node, char *out, size_t outlen, size_t *needed,
                            char *errbuf, size_t errlen);

/* The node's tailnet IPs as a JSON array of strings ([] before it is up). */
int tsnetbridge_node_ips(int64_t node, char *out, size_t outlen, size_t *needed,
                         char *errbuf, size_t errlen);

/*
 * The node's full view of the tailnet: tsnet's LocalClient().Status() as
 * JSON (ipnstate.Status: "Self", "Peer" keyed by node key, "User", ...), the
 * same document tailscaled's LocalAPI serves at /localapi/v0/status.
 * TSNB_EINVAL when the node is not up.
 */
int tsnetbridge_node_peers(int64_t node, char *out, size_t outlen, size_t *needed,
                           char *errbuf, size_t errlen);

/*
 * Listens on the node's tailnet addresses, TCP port `port` (0: pick one).
 * *out_fd is an AF_UNIX SOCK_SEQPACKET socket (non-blocking, close-on-exec).
 * Each accepted connection arrives on it as ONE message whose payload is the
 * peer's "ip:port" (UTF-8, no NUL) and whose SCM_RIGHTS control data carries
 * exactly one fd: an AF_UNIX SOCK_STREAM socket (non-blocking) relaying the
 * connection's bytes. Receive with MSG_CMSG_CLOEXEC. Shutting down the write
 * side of that socket half-closes the tailnet connection and vice versa;
 * closing it closes the connection. A zero-length read means the listener is
 * gone (node closed). Closing *out_fd also closes the listener.
 */
int tsnetbridge_node_listen(int64_t node, uint16_t port, int64_t *out_listener, int *out_fd,
                            uint16_t *out_port, char *errbuf, size_t errlen);

/* Closes a listener (idempotent for live handles). */
int tsnetbridge_listener_close(int64_t listener, char *errbuf, size_t errlen);

/*
 * Dials "host:port" or "ip:port" through the tailnet (MagicDNS names
 * resolve), waiting up to timeout_ms. *out_fd is an AF_UNIX SOCK_STREAM
 * socket (non-blocking, close-on-exec) relaying the connection, with the same
 * half-close behaviour as accepted connections.
 */
int tsnetbridge_node_dial(int64_t node, char *addr, int64_t timeout_ms, int *out_fd,
                          char *errbuf, size_t errlen);

/*
 * WhoIs for a peer "ip:port": JSON of tailscale.com/client/tailscale/apitype
 * WhoIsResponse ({"Node": ..., "UserProfile": ..., "CapMap": ...}).
 * TSNB_ENOENT when no peer has that address.
 */
int tsnetbridge_node_whois(int64_t node, char *addr, int64_t timeout_ms, char *out,
                           size_t outlen, size_t *needed, char *errbuf, size_t errlen);

/*
 * tsnet's Loopback(): a SOCKS5 proxy into the tailnet on 127.0.0.1.
 * JSON: {"addr": "127.0.0.1:PORT", "socks5_user": "tsnet", "socks5_password": str}.
 * Starts the node if needed; idempotent.
 */
int tsnetbridge_node_loopback(int64_t node, char *out, size_t outlen, size_t *needed,
                              char *errbuf, size_t errlen);

/*
 * Stops the node and frees the handle: closes its listeners (their sockets
 * read EOF) and connections; an ephemeral node logs out (tsnet does this on
 * shutdown, best effort, bounded by tsnet's own timeouts).
 */
int tsnetbridge_node_close(int64_t node, char *errbuf, size_t errlen);

/*
 * The embedded local tailnet (only when built with -tags tailkitd_localnet):
 * testcontrol + DERP + STUN on 127.0.0.1.
 * opts_json: {"interactive_login": bool}. With interactive_login, nodes get a
 * login URL (approve it with tsnetbridge_localnet_approve); otherwise they
 * join with the auth key from tsnetbridge_localnet_info.
 */
int tsnetbridge_localnet_start(char *opts_json, int64_t *out_localnet, char *errbuf,
                               size_t errlen);

/* JSON: {"control_url": str, "auth_key": str|null}. */
int tsnetbridge_localnet_info(int64_t localnet, char *out, size_t outlen, size_t *needed,
                              char *errbuf, size_t errlen);

/*
 * Grants an app capability to the peers with the given source IPs toward every
 * node, now and for nodes that join later.
 * grant_json: {"src_ips": [str], "cap": str, "values": [json...]}
 */
int tsnetbridge_localnet_grant(int64_t localnet, char *grant_json, char *errbuf,
                               size_t errlen);

/* Completes an interactive login, as if the user visited the URL. */
int tsnetbridge_localnet_approve(int64_t localnet, char *auth_url, char *errbuf,
                                 size_t errlen);

/* Stops the control, DERP and STUN servers and frees the handle. */
int tsnetbridge_localnet_close(int64_t localnet, char *errbuf, size_t errlen);

#endif /* TSNETBRIDGE_H */
