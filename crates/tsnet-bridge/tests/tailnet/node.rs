//! One node's behaviour: descriptors children inherit, blocking calls,
//! bad settings, login URLs, the SOCKS5 proxy, ephemeral nodes, signal
//! storms.

use super::*;

/// The fds of a child process, as `ls -l /proc/self/fd` in it sees them:
/// (fd, link target).
fn child_fds() -> Vec<(u32, String)> {
    let out = Command::new("/bin/ls")
        .args(["-l", "/proc/self/fd/"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run ls");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (left, target) = line.split_once(" -> ")?;
            let fd = left.split_whitespace().last()?.parse().ok()?;
            Some((fd, target.to_string()))
        })
        .collect()
}

/// This process's fds that a child would inherit (no close-on-exec, as
/// /proc/self/fdinfo shows), as (fd, link target): before anything of the
/// bridge starts, these can only come from whoever started this process
/// (cargo's jobserver pipes, a shell's fds).
fn inheritable_fds() -> Vec<(u32, String)> {
    const O_CLOEXEC: u32 = 0o2_000_000;
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let fd: u32 = entry.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            (fd > 2 && flags & O_CLOEXEC == 0).then(|| (fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

fn is_cloexec(fd: &impl std::os::fd::AsFd) -> bool {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    flags & libc::FD_CLOEXEC != 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_inherit_no_tailnet_fds() {
    guarded(async {
        let before = inheritable_fds();
        let net = Net::start().await;
        let a = net.node("fdserver").await;
        let b = net.node("fdclient").await;
        let listener = a.listen(9000).await.unwrap();
        let target = format!("{}:9000", ipv4(&a));
        let (dialed, accepted) = tokio::join!(b.dial(&target), listener.accept());
        let mut dialed = dialed.unwrap();
        let (mut accepted, _) = accepted.unwrap();
        dialed.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        accepted.read_exact(&mut one).await.unwrap();
        let _loopback = a.loopback().await.unwrap();

        let fds = child_fds();
        let unexpected: Vec<_> = fds
            .iter()
            .filter(|(fd, target)| {
                *fd > 2
                    // the directory `ls` opened to list its fds
                    && !(target.starts_with("/proc/") && target.ends_with("/fd"))
                    // inherited by this test process itself, the same fd
                    // before any node started
                    && !before.iter().any(|(f, t)| f == fd && t == target)
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "the child inherited fds beyond 0, 1, 2: {unexpected:?} (all: {fds:?})"
        );
        if !before.is_empty() {
            eprintln!("note: fds the test process itself inherited: {before:?}");
        }
        // The connection still works afterwards.
        accepted.write_all(b"y").await.unwrap();
        dialed.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"y");

        // And the fds themselves say so.
        assert!(is_cloexec(&accepted.into_inner()));
        assert!(is_cloexec(&dialed.into_inner()));
    })
    .await;
}

/// On a single-threaded runtime, a long bridge call (`up` against a
/// control server that never answers) must leave the thread free: a ticker
/// beside it keeps ticking.
#[tokio::test(flavor = "current_thread")]
async fn bridge_calls_do_not_block_the_runtime() {
    guarded(async {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::new(NodeConfig {
            control_url: Some("http://127.0.0.1:9".into()),
            auth_key: Some("tskey-auth-unused".into()),
            ..NodeConfig::new("blocking", dir.path().join("blocking"))
        })
        .unwrap();
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                let mut interval = tokio::time::interval(Duration::from_millis(50));
                loop {
                    interval.tick().await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        let before = ticks.load(std::sync::atomic::Ordering::SeqCst);
        let err = node.up(Duration::from_secs(2)).await.unwrap_err();
        let during = ticks.load(std::sync::atomic::Ordering::SeqCst) - before;
        ticker.abort();
        assert!(matches!(err, BridgeError::Timeout { .. }), "{err:?}");
        // 2 s of 50 ms ticks is 40; a blocked thread would give 0 or 1.
        assert!(
            during >= 10,
            "the runtime ticked {during} times during up()"
        );
        node.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_give_clear_errors() {
    guarded(async {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();

        // Nothing listens there: a timeout naming the control server.
        let url = "http://127.0.0.1:9";
        let node = Node::new(NodeConfig {
            control_url: Some(url.into()),
            auth_key: Some("tskey-auth-unused".into()),
            ..NodeConfig::new("unreachable", dir.path().join("unreachable"))
        })
        .unwrap();
        let timeout = Duration::from_secs(8);
        let started = Instant::now();
        let err = node.up(timeout).await.unwrap_err();
        let took = started.elapsed();
        eprintln!("unreachable control server: {err} (after {took:?})");
        assert!(
            matches!(err, BridgeError::Timeout { op: "up", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(url), "{err}");
        assert!(took < timeout + Duration::from_secs(5), "took {took:?}");
        node.close().await.unwrap();

        // Invalid hostnames are refused up front, naming the hostname.
        for bad in ["bad host!", "-leading", "dots.not.allowed", ""] {
            match Node::new(NodeConfig::new(bad, dir.path().join("x"))) {
                Err(BridgeError::InvalidConfig(msg)) => {
                    assert!(msg.contains(&format!("{bad:?}")), "{msg}")
                }
                other => panic!("hostname {bad:?}: {other:?}"),
            }
        }

        // A wrong auth key is refused by the control server: an error, no hang.
        let net = Net::start().await;
        let node = Node::new(NodeConfig {
            auth_key: Some("tskey-auth-wrong".into()),
            ..net.config("wrongkey")
        })
        .unwrap();
        let err = node.up(Duration::from_secs(20)).await.unwrap_err();
        eprintln!("wrong auth key: {err}");
        assert!(!matches!(err, BridgeError::NeedsLogin { .. }), "{err:?}");

        // Calls on a closed node fail cleanly.
        let node = Node::new(net.config("closed")).unwrap();
        node.shutdown().await.unwrap();
        assert!(matches!(
            node.status().await,
            Err(BridgeError::Closed { .. })
        ));
        assert!(matches!(node.ips(), Err(BridgeError::Closed { .. })));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_reports_the_login_url_until_approved() {
    guarded(async {
        let net = Net::start_with(LocalnetOptions {
            interactive_login: true,
        })
        .await;
        assert_eq!(net.localnet.auth_key(), None);
        let node = Node::new(net.config("newcomer")).unwrap();
        let url = match node.up(UP).await {
            Err(BridgeError::NeedsLogin { url }) => url,
            other => panic!("want NeedsLogin, got {other:?}"),
        };
        assert!(url.starts_with(net.localnet.control_url()), "{url}");
        let status = node.status().await.unwrap();
        assert_eq!(status.backend_state, "NeedsLogin");
        assert_eq!(status.auth_url.as_deref(), Some(url.as_str()));

        net.localnet.approve_login(&url).await.unwrap();
        let status = node.up(UP).await.expect("up after approval");
        assert_eq!(status.backend_state, "Running");
        assert!(!status.ips.is_empty());
        assert!(
            net.localnet
                .approve_login("http://nope/auth/x")
                .await
                .is_err()
        );
    })
    .await;
}

/// A minimal SOCKS5 CONNECT with user/password auth (RFC 1928, RFC 1929) to
/// `host:port`, as curl's `--socks5-hostname` does.
async fn socks5_connect(
    proxy: &tsnet_bridge::LoopbackProxy,
    host: &str,
    port: u16,
) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap(); // v5, one method: user/password
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [5, 2], "proxy wants user/password auth");
    let (user, pass) = (
        proxy.socks5_user.as_bytes(),
        proxy.socks5_password.as_bytes(),
    );
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user);
    auth.push(pass.len() as u8);
    auth.extend_from_slice(pass);
    s.write_all(&auth).await.unwrap();
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [1, 0], "proxy accepts the credentials");
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[1], 0, "SOCKS5 CONNECT to {host}:{port} succeeded");
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await.unwrap();
            usize::from(len[0]) + 2
        }
        other => panic!("bad SOCKS5 address type {other}"),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_socks5_reaches_peers_by_name() {
    guarded(async {
        let net = Net::start().await;
        let server = net.node("webserver").await;
        let client = net.node("curler").await;
        let listener = server.listen(0).await.unwrap();
        let port = listener.port();
        assert_ne!(port, 0, "port 0 picks a free port");

        let proxy = client.loopback().await.unwrap();
        assert!(proxy.addr.ip().is_loopback());
        assert_eq!(proxy.socks5_user, "tsnet");
        assert_eq!(client.loopback().await.unwrap(), proxy, "idempotent");

        let accept = tokio::spawn(async move {
            let (mut conn, peer) = listener.accept().await.unwrap();
            let mut buf = BufReader::new(&mut conn);
            let mut line = String::new();
            buf.read_line(&mut line).await.unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            conn.shutdown().await.unwrap();
            (line, peer)
        });
        let mut s = socks5_connect(&proxy, "webserver", port).await;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: webserver\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).await.unwrap();
        let (line, peer) = accept.await.unwrap();
        assert_eq!(line, "GET /health HTTP/1.1\r\n");
        assert!(response.ends_with("\r\n\r\nok"), "{response}");
        assert!(client.ips().unwrap().contains(&peer.ip()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_nodes_come_up_and_close_cleanly() {
    guarded(async {
        let net = Net::start().await;
        let node = Node::new(NodeConfig {
            ephemeral: true,
            ..net.config("sidecar")
        })
        .unwrap();
        let status = node.up(UP).await.unwrap();
        assert_eq!(status.backend_state, "Running");
        node.close()
            .await
            .expect("an ephemeral node logs out and closes");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_storms_while_nodes_carry_traffic() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use tokio::signal::unix::{SignalKind, signal};

    guarded(async {
        // tokio's handlers, made safe for the Go runtime as the daemon does.
        // Without ensure_signal_onstack this test crashes the process
        // (SIGSEGV or "fatal error: unknown caller pc" from Go) in most runs.
        let mut sigchld = signal(SignalKind::child()).unwrap();
        let mut sighup = signal(SignalKind::hangup()).unwrap();
        ensure_signal_onstack(&[libc::SIGCHLD, libc::SIGHUP]).unwrap();
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let counter = tokio::spawn({
            let counts = counts.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = sigchld.recv() => counts[0].fetch_add(1, Ordering::Relaxed),
                        _ = sighup.recv() => counts[1].fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        });

        let net = Net::start().await;
        let server = net.node("stormserver").await;
        let client = net.node("stormclient").await;
        let listener = server.listen(7100).await.unwrap();
        let echo = tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    conn.read_to_end(&mut buf).await.unwrap();
                    conn.write_all(&buf).await.unwrap();
                    conn.shutdown().await.unwrap();
                });
            }
        });
        let target = format!("{}:7100", ipv4(&server));
        let traffic = tokio::spawn(async move {
            let payload: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            for _ in 0..60 {
                let mut s = client.dial(&target).await.unwrap();
                s.write_all(&payload).await.unwrap();
                s.shutdown().await.unwrap();
                assert_eq!(read_all(&mut s).await, payload);
            }
            client
        });

        // Hundreds of children exiting at once, and bursts of SIGHUP, landing
        // on whatever thread (Go's included) the kernel picks.
        let storm = tokio::task::spawn_blocking(|| {
            for _ in 0..3 {
                let children: Vec<_> = (0..150)
                    .map(|_| Command::new("/bin/true").spawn().expect("spawn"))
                    .collect();
                for mut child in children {
                    child.wait().unwrap();
                }
                for _ in 0..50 {
                    kill(Pid::this(), Signal::SIGHUP).unwrap();
                }
            }
        });
        storm.await.unwrap();
        let _client = traffic.await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        echo.abort();
        counter.abort();
        let (chld, hup) = (
            counts[0].load(Ordering::Relaxed),
            counts[1].load(Ordering::Relaxed),
        );
        eprintln!("signal storm: tokio saw {chld} SIGCHLD and {hup} SIGHUP wake-ups");
        assert!(chld > 0 && hup > 0);
        // The node still works after the storm.
        assert_eq!(server.status().await.unwrap().backend_state, "Running");
    })
    .await;
}
