//! Connections and who they come from: dial/accept, identity under load,
//! capability grants.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_dial_and_accept() {
    guarded(async {
        let net = Net::start().await;
        let a = Node::new(net.config("alpha")).unwrap();
        let started = Instant::now();
        let a_status = a.up(UP).await.expect("alpha up");
        eprintln!(
            "up() of the first node on the local tailnet took {:?}",
            started.elapsed()
        );
        let started = Instant::now();
        let b = net.node("bravo").await;
        eprintln!("up() of the second node took {:?}", started.elapsed());

        assert_eq!(a_status.backend_state, "Running");
        assert_eq!(a_status.dns_name, format!("alpha.{MAGIC_DNS_SUFFIX}"));
        assert_eq!(a_status.user_login, Localnet::user_login("alpha"));
        assert_eq!(a_status.ips, a.ips().unwrap());
        assert_eq!(a_status.auth_url, None);

        let listener = a.listen(8080).await.unwrap();
        assert_eq!(listener.port(), 8080);

        // By IP: a request, half-close, a response, half-close.
        let client = tokio::spawn({
            let target = format!("{}:8080", ipv4(&a));
            async move {
                let _keep = &b;
                let mut s = b.dial(&target).await.expect("dial alpha by IP");
                s.write_all(b"hello from bravo").await.unwrap();
                s.shutdown().await.unwrap();
                let reply = read_all(&mut s).await;
                (b, reply)
            }
        });
        let (mut conn, peer) = listener.accept().await.unwrap();
        let request = read_all(&mut conn).await;
        assert_eq!(request, b"hello from bravo");
        conn.write_all(b"hello back from alpha").await.unwrap();
        conn.shutdown().await.unwrap();
        let (b, reply) = client.await.unwrap();
        assert_eq!(reply, b"hello back from alpha");
        assert!(
            b.ips().unwrap().contains(&peer.ip()),
            "alpha sees bravo's tailnet address ({peer} not in {:?})",
            b.ips().unwrap()
        );
        let who = a.whois(peer).await.unwrap();
        assert_eq!(who.node_name.split('.').next().unwrap(), "bravo");

        // The peer list (bravo is in alpha's netmap: whois found it):
        // tsnet's ipnstate.Status, as tailscaled serves it.
        let peers: serde_json::Value =
            serde_json::from_slice(&a.peers_json().await.unwrap()).unwrap();
        assert_eq!(peers["BackendState"], "Running", "{peers}");
        assert_eq!(peers["Self"]["HostName"], "alpha", "{peers}");
        let listed: Vec<&serde_json::Value> = peers["Peer"]
            .as_object()
            .map(|m| m.values().collect())
            .unwrap_or_default();
        assert_eq!(listed.len(), 1, "{peers}");
        assert_eq!(listed[0]["HostName"], "bravo");
        assert_eq!(
            listed[0]["DNSName"],
            format!("bravo.{MAGIC_DNS_SUFFIX}."),
            "{peers}"
        );
        let bravo_ip = ipv4(&b).to_string();
        assert!(
            listed[0]["TailscaleIPs"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|ip| *ip == *bravo_ip)),
            "{peers}"
        );
        let unstarted = Node::new(net.config("charlie")).unwrap();
        assert!(matches!(
            unstarted.peers_json().await,
            Err(BridgeError::InvalidConfig(_))
        ));
        drop(unstarted);

        // By short MagicDNS name and by full name; bytes both ways.
        for target in [
            "alpha:8080".to_string(),
            format!("alpha.{MAGIC_DNS_SUFFIX}:8080"),
        ] {
            let dial = b.dial(&target);
            let accept = listener.accept();
            let (dialed, accepted) = tokio::join!(dial, accept);
            let mut dialed = dialed.unwrap_or_else(|e| panic!("dial {target}: {e}"));
            let (mut accepted, peer) = accepted.unwrap();
            assert!(b.ips().unwrap().contains(&peer.ip()));
            dialed.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            accepted.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            accepted.write_all(b"pong").await.unwrap();
            dialed.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"pong");
            // Dropping one side closes the connection for the other.
            drop(accepted);
            assert!(read_all(&mut dialed).await.is_empty());
        }

        // A port nobody listens on is an error, not a hang.
        let err = b
            .dial_timeout(&format!("{}:9", ipv4(&a)), Duration::from_secs(10))
            .await
            .unwrap_err();
        eprintln!("dial to a closed port: {err}");

        // An address of no peer is not found.
        let nobody: SocketAddr = "100.100.1.1:1".parse().unwrap();
        assert!(matches!(
            a.whois(nobody).await,
            Err(BridgeError::PeerNotFound { .. })
        ));

        drop(listener);
        a.close().await.unwrap();
        b.close().await.unwrap();
        net.localnet.close().await.unwrap();
    })
    .await;
}

/// Spawns and reaps children (each with two fresh pipes) until `stop`.
fn churn_children(stop: Arc<AtomicBool>, spawned: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let out = Command::new("/bin/true")
                .stdin(Stdio::null())
                .output()
                .expect("spawn /bin/true");
            assert!(out.status.success());
            spawned.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_under_concurrent_peers() {
    const CLIENTS: usize = 4;
    const CONNS_PER_CLIENT: usize = 60;
    const PARALLEL_PER_CLIENT: usize = 6;
    const _: () = assert!(CONNS_PER_CLIENT.is_multiple_of(PARALLEL_PER_CLIENT));

    guarded(async {
        let _heavy = HEAVY.lock().await;
        // SIGCHLD storms land on Go threads too: tokio's handler must be
        // SA_ONSTACK-safe for this test to survive the churn.
        let mut sigchld =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).unwrap();
        ensure_signal_onstack(&[libc::SIGCHLD]).unwrap();
        let sigchld_seen = Arc::new(AtomicUsize::new(0));
        let sig_task = tokio::spawn({
            let seen = sigchld_seen.clone();
            async move {
                while sigchld.recv().await.is_some() {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        });

        let net = Net::start().await;
        let server = Arc::new(net.node("server").await);
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            clients.push(Arc::new(net.node(&format!("client{i}")).await));
        }
        let mut users = BTreeSet::new();
        for c in &clients {
            users.insert(c.status().await.unwrap().user_login);
        }
        assert_eq!(
            users.len(),
            CLIENTS,
            "each client has its own user: {users:?}"
        );

        let listener = server.listen(7000).await.unwrap();
        let total = CLIENTS * CONNS_PER_CLIENT;
        let misattributed = Arc::new(AtomicUsize::new(0));
        let checked = Arc::new(AtomicUsize::new(0));

        let stop = Arc::new(AtomicBool::new(false));
        let spawned = Arc::new(AtomicUsize::new(0));
        let churn = churn_children(stop.clone(), spawned.clone());

        let acceptor = tokio::spawn({
            let server = server.clone();
            let misattributed = misattributed.clone();
            let checked = checked.clone();
            async move {
                let mut handlers = tokio::task::JoinSet::new();
                for _ in 0..total {
                    let (stream, peer) = listener.accept().await.expect("accept");
                    let server = server.clone();
                    let misattributed = misattributed.clone();
                    let checked = checked.clone();
                    handlers.spawn(async move {
                        let mut stream = BufReader::new(stream);
                        let mut claimed = String::new();
                        stream.read_line(&mut claimed).await.unwrap();
                        let claimed = claimed.trim_end().to_string();
                        let who = server.whois(peer).await.expect("whois of an accepted peer");
                        if who.node_name.split('.').next().unwrap() != claimed
                            || who.user_login != Localnet::user_login(&claimed)
                        {
                            eprintln!(
                                "MISATTRIBUTED: {peer} claimed {claimed:?}, whois says {:?} / {:?}",
                                who.node_name, who.user_login
                            );
                            misattributed.fetch_add(1, Ordering::SeqCst);
                        }
                        checked.fetch_add(1, Ordering::SeqCst);
                        stream.get_mut().write_all(b"ok\n").await.unwrap();
                        stream.get_mut().shutdown().await.unwrap();
                    });
                }
                while let Some(res) = handlers.join_next().await {
                    res.expect("handler");
                }
                listener
            }
        });

        let target = format!("{}:7000", ipv4(&server));
        let mut senders = tokio::task::JoinSet::new();
        for (i, client) in clients.iter().enumerate() {
            for _ in 0..PARALLEL_PER_CLIENT {
                let client = client.clone();
                let target = target.clone();
                let name = format!("client{i}");
                let count = CONNS_PER_CLIENT / PARALLEL_PER_CLIENT;
                senders.spawn(async move {
                    for _ in 0..count {
                        let mut s = client.dial(&target).await.expect("dial server");
                        s.write_all(format!("{name}\n").as_bytes()).await.unwrap();
                        let reply = read_all(&mut s).await;
                        assert_eq!(reply, b"ok\n");
                    }
                });
            }
        }
        while let Some(res) = senders.join_next().await {
            res.expect("client lane");
        }
        let _listener = acceptor.await.unwrap();
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        sig_task.abort();

        let children = spawned.load(Ordering::Relaxed);
        eprintln!(
            "{total} connections checked while {children} children were spawned and reaped \
             ({} SIGCHLD seen by tokio)",
            sigchld_seen.load(Ordering::Relaxed)
        );
        assert_eq!(checked.load(Ordering::SeqCst), total);
        assert_eq!(
            misattributed.load(Ordering::SeqCst),
            0,
            "zero misattributions"
        );
        assert!(children > 0, "the churn thread ran");
    })
    .await;
}

/// Polls `whois` of `peer` on `node` until `pred` holds.
async fn await_identity(
    node: &Node,
    peer: SocketAddr,
    what: &str,
    pred: impl Fn(&tsnet_bridge::WhoIs) -> bool,
) -> tsnet_bridge::WhoIs {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let who = node.whois(peer).await.unwrap();
        if pred(&who) {
            return who;
        }
        assert!(Instant::now() < deadline, "{what}: last identity {who:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_caps_from_localnet_grants() {
    const X: &str = "example.com/cap/x";
    const Y: &str = "example.com/cap/y";
    guarded(async {
        let net = Net::start().await;
        let capable = net.node("capable").await;
        let plain = net.node("plain").await;
        net.localnet
            .grant(&capable.ips().unwrap(), X)
            .await
            .unwrap();

        // The server joins after the grant and must still get it.
        let server = net.node("capserver").await;
        let listener = server.listen(80).await.unwrap();
        let target = format!("{}:80", ipv4(&server));

        let mut peers = Vec::new();
        for client in [&capable, &plain] {
            let (dialed, accepted) = tokio::join!(client.dial(&target), listener.accept());
            let _dialed = dialed.unwrap();
            let (_conn, peer) = accepted.unwrap();
            peers.push(peer);
        }
        let (capable_peer, plain_peer) = (peers[0], peers[1]);

        let who = await_identity(&server, capable_peer, "capable gets x", |w| {
            w.caps.contains_key(X)
        })
        .await;
        assert_eq!(who.node_name.split('.').next().unwrap(), "capable");
        assert_eq!(who.caps[X], vec![serde_json::json!({})]);
        let who = server.whois(plain_peer).await.unwrap();
        assert_eq!(who.node_name.split('.').next().unwrap(), "plain");
        assert!(
            !who.caps.contains_key(X),
            "plain must not hold {X}: {who:?}"
        );

        // A grant made while everyone is up reaches them too.
        net.localnet
            .grant_with_values(
                &plain.ips().unwrap(),
                Y,
                &[serde_json::json!({"tools": ["a"]})],
            )
            .await
            .unwrap();
        let who = await_identity(&server, plain_peer, "plain gets y", |w| {
            w.caps.contains_key(Y)
        })
        .await;
        assert!(!who.caps.contains_key(X));
        assert_eq!(who.caps[Y], vec![serde_json::json!({"tools": ["a"]})]);
        let who = server.whois(capable_peer).await.unwrap();
        assert!(
            who.caps.contains_key(X) && !who.caps.contains_key(Y),
            "{who:?}"
        );
    })
    .await;
}

/// What happens to connections that arrive while nobody accepts them (the
/// daemon's 512 slots are all taken): a few wait in the listener socket's
/// queue (and one in the bridge's hands), and tsnet closes every further
/// one that it cannot hand over to the bridge within 1 s. The README
/// describes these numbers; this test measures them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_what_is_accepted_are_closed_by_tsnet() {
    guarded(async {
        let _heavy = HEAVY.lock().await;
        let net = Net::start().await;
        let server = net.node("busy").await;
        let client = Arc::new(net.node("eager").await);
        let listener = server.listen(8080).await.unwrap();
        let target = format!("{}:8080", ipv4(&server));

        // Nobody accepts. Dial more connections than the listener socket's
        // buffer holds messages (208 KiB by default, about 280 messages);
        // each one whose peer closes it reads end of stream, each one that
        // waits reads nothing.
        const DIALED: usize = 320;
        let started = Instant::now();
        let mut dials = tokio::task::JoinSet::new();
        for i in 0..DIALED {
            let client = client.clone();
            let target = target.clone();
            dials.spawn(async move {
                let mut s = client.dial(&target).await.expect("dial");
                s.write_all(format!("{i}\n").as_bytes()).await.unwrap();
                let mut byte = [0u8; 1];
                let closed = matches!(
                    tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await,
                    Ok(Ok(0) | Err(_))
                );
                (i, closed, started.elapsed(), s)
            });
        }
        let mut closed = Vec::new();
        let mut waiting = Vec::new();
        while let Some(r) = dials.join_next().await {
            let (i, was_closed, after, s) = r.unwrap();
            if was_closed {
                closed.push(after);
            } else {
                waiting.push((i, s));
            }
        }
        closed.sort();
        eprintln!(
            "{} of {DIALED} connections waited; {} were closed by tsnet, after {:?} to {:?}",
            waiting.len(),
            closed.len(),
            closed.first(),
            closed.last()
        );
        assert!(!waiting.is_empty(), "no connection waited at all");
        assert!(!closed.is_empty(), "every connection waited");

        // Once accepting resumes, the waiting ones arrive, intact (tsnet
        // may still close one that waited longer than its 1 s hand-over
        // limit while the bridge's socket was full: under load that lost
        // one now and then, so the count is reported, not required), and
        // nothing arrives that did not wait.
        let mut accepted = 0;
        while let Ok(next) = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await
        {
            let (mut conn, _) = next.unwrap();
            let mut line = String::new();
            BufReader::new(&mut conn)
                .read_line(&mut line)
                .await
                .unwrap();
            assert!(line.trim().parse::<usize>().is_ok(), "{line:?}");
            accepted += 1;
        }
        eprintln!(
            "{accepted} of the {} waiting connections arrived",
            waiting.len()
        );
        assert!(accepted >= 1, "no waiting connection arrived");
        assert!(
            accepted <= waiting.len(),
            "{accepted} arrived, {} waited",
            waiting.len()
        );
        let fresh = tokio::spawn({
            let client = client.clone();
            async move { client.dial(&target).await.map(|_| ()) }
        });
        let (_conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .expect("a new connection after the flood")
            .unwrap();
        fresh.await.unwrap().unwrap();
        // Closed before the next heavy test may start.
        drop((waiting, listener));
        server.close().await.unwrap();
        Arc::into_inner(client).unwrap().close().await.unwrap();
        net.localnet.close().await.unwrap();
    })
    .await;
}
