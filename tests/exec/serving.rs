//! Serving connections: the API over loopback TCP with a resolver.

use tokio_util::sync::CancellationToken;

use super::*;

/// Serves `d`'s router on a loopback port with `resolver`.
async fn serve(d: &Stack, resolver: ByIp) -> SocketAddr {
    serve_on_loopback(d, resolver).await
}

async fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn loopback_requests_fail_closed_for_unknown_peers() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let addr = serve(&d, ByIp(BTreeMap::new())).await;
    let out = http(addr, &format!("POST /exec/t/c HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("could not identify caller"));
    assert!(d.api.executor().jobs().is_empty());
    let denied = d.audit_records().pop().unwrap();
    assert_eq!(denied["event"], "exec.denied");
    assert_eq!(denied["caller"]["ip"], "127.0.0.1");
}

#[tokio::test]
async fn loopback_round_trip_with_keep_alive() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let addr = serve(
        &d,
        ByIp(BTreeMap::from([("127.0.0.1".parse().unwrap(), alice())])),
    )
    .await;
    let post = format!(
        "POST /exec/t/c?wait=30s HTTP/1.1\r\nHost: {HOST}:80\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let health = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let out = http(addr, &format!("{post}{health}")).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains(r#""stdout":"hi\n""#), "{out}");
    assert!(out.contains(r#""status":"completed""#));
    assert!(out.contains(r#""hostname":"tailkitd-test""#));
    let accepted = d
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "exec.accepted")
        .unwrap();
    assert_eq!(accepted["caller"]["user"], "alice@example.com");
}

#[tokio::test(start_paused = true)]
async fn slow_headers_close_the_connection() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let (mut client, server) = tokio::io::duplex(4096);
    let resolver: Arc<dyn IdentityResolver> = Arc::new(ByIp(BTreeMap::new()));
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let conn = tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        CancellationToken::new(),
    ));
    client
        .write_all(b"POST /exec/t/c HTTP/1.1\r\nHost: tailkitd-test\r\n")
        .await
        .unwrap();
    // Time only advances while everything waits: the header timeout fires,
    // the server closes, and the read sees the end of the stream.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(600), client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(
        conn.await.unwrap().is_err(),
        "served with a header timeout error"
    );
    assert!(d.api.executor().jobs().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_arrives_is_refused_408_and_runs_nothing() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let (mut client, server) = tokio::io::duplex(4096);
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let resolver: Arc<dyn IdentityResolver> =
        Arc::new(ByIp(BTreeMap::from([(peer.ip(), alice())])));
    tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        CancellationToken::new(),
    ));
    client
        .write_all(
            format!("POST /exec/t/c HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 10\r\n\r\n{{}}")
                .as_bytes(),
        )
        .await
        .unwrap();
    // The other 8 bytes never come; time only advances while all wait.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(600), client.read(&mut buf))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let out = String::from_utf8_lossy(&buf[..n]);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(d.api.executor().jobs().is_empty());
    assert_eq!(d.audit_records().pop().unwrap()["http_status"], 408);
}

#[tokio::test]
async fn connections_close_gracefully_on_shutdown() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let (mut client, server) = tokio::io::duplex(4096);
    let resolver: Arc<dyn IdentityResolver> = Arc::new(ByIp(BTreeMap::from([(
        "100.64.0.7".parse().unwrap(),
        alice(),
    )])));
    let stop = CancellationToken::new();
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let conn = tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        stop.clone(),
    ));
    client
        .write_all(format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = client.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    stop.cancel();
    let served = tokio::time::timeout(LONG, conn)
        .await
        .expect("the idle connection closed");
    assert!(served.unwrap().is_ok());
}

/// Reads from `client` until `marker` has been seen `count` times (or the
/// stream ends); returns what it read.
async fn read_until(client: &mut tokio::io::DuplexStream, marker: &str, count: usize) -> String {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    while String::from_utf8_lossy(&out).matches(marker).count() < count {
        let n = client.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `client` (it reads the end of the stream,
/// or an error, within the hang guard).
async fn closed(client: &mut tokio::io::DuplexStream) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(600), client.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test(start_paused = true)]
async fn kept_alive_connections_outlive_a_minute_of_silence_but_not_the_idle_timeout() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let resolver: Arc<dyn IdentityResolver> =
        Arc::new(ByIp(BTreeMap::from([(peer.ip(), alice())])));
    let (mut client, server) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve_connection(
        server,
        peer,
        resolver.clone(),
        d.api.router(),
        CancellationToken::new(),
    ));
    let health = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    client.write_all(health.as_bytes()).await.unwrap();
    assert!(
        read_until(&mut client, "\"ok\"", 2)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // A minute of silence (paused time: it passes at once) ...
    tokio::time::sleep(Duration::from_secs(70)).await;
    // ... and the same connection answers again.
    client.write_all(health.as_bytes()).await.unwrap();
    let again = read_until(&mut client, "\"ok\"", 2).await;
    assert!(
        again.starts_with("HTTP/1.1 200"),
        "closed after 70 s idle: {again:?}"
    );

    // The head of a request still has 10 s from its first byte.
    client.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(closed(&mut client).await, "a stalled head was not cut off");
    let took = started.elapsed();
    assert!(
        took >= HEADER_READ_TIMEOUT && took < IDLE_TIMEOUT,
        "a stalled head was closed after {took:?}"
    );

    // A connection idle for longer than the idle timeout is closed.
    let (mut client, server) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        CancellationToken::new(),
    ));
    client.write_all(health.as_bytes()).await.unwrap();
    read_until(&mut client, "\"ok\"", 2).await;
    let started = tokio::time::Instant::now();
    assert!(
        closed(&mut client).await,
        "an idle connection was never closed"
    );
    assert!(started.elapsed() >= IDLE_TIMEOUT, "{:?}", started.elapsed());
}

/// Resolves like [`ByIp`] and counts the requests it was asked about.
struct Counting(ByIp, Arc<std::sync::atomic::AtomicUsize>);

impl IdentityResolver for Counting {
    fn resolve(
        &self,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Identity, String>> + Send + '_>>
    {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.resolve(peer)
    }
}

#[tokio::test]
async fn a_peer_that_pipelines_and_never_reads_costs_one_response_and_is_dropped() {
    let d = Stack::command(
        json!(["/bin/sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' a"]),
        json!([]),
        settings(),
    );
    let id = d.run("").await["job_id"].as_str().unwrap().to_string();
    let budget = d.api.response_budget_available();
    // From here on, time passes only while everything waits.
    tokio::time::pause();
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let resolver: Arc<dyn IdentityResolver> = Arc::new(Counting(
        ByIp(BTreeMap::from([(peer.ip(), alice())])),
        served.clone(),
    ));
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let conn = tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        CancellationToken::new(),
    ));
    // 2 000 GETs of a 1 MiB result in one write, never read: written from
    // a task of its own, as the server takes what it reads.
    let get = format!("GET /exec/jobs/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").repeat(2000);
    let writer = tokio::spawn(async move {
        let _ = client.write_all(get.as_bytes()).await;
        client
    });
    let ended = tokio::time::timeout(Duration::from_secs(600), conn).await;
    let result = ended.expect("a peer that never reads was never dropped");
    assert!(result.unwrap().is_err(), "ended by the write stall timeout");
    let served = served.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        served <= 2,
        "{served} responses were built for a peer that reads none"
    );
    writer.abort();
    assert_eq!(
        d.api.response_budget_available(),
        budget,
        "the dropped connection gave its response back"
    );
}

#[tokio::test]
async fn strict_http_refusals_reach_the_caller_through_hyper() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let addr = serve(
        &d,
        ByIp(BTreeMap::from([("127.0.0.1".parse().unwrap(), alice())])),
    )
    .await;
    for (request, status) in [
        (
            format!(
                "POST http://evil.example.com/exec/t/c HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            ),
            "421",
        ),
        (
            format!(
                "POST /exec/t/c HTTP/1.1\r\nHost: {HOST}\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            ),
            "400",
        ),
        (
            format!(
                "POST /exec/t/c HTTP/1.1\r\nHost: {HOST}:99999\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            ),
            "400",
        ),
        (
            format!(
                "POST /exec/t/c HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
            ),
            "501",
        ),
    ] {
        let out = http(addr, &request).await;
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?}: {out}"
        );
        assert!(out.contains("\"error\""), "{out}");
    }
    assert!(d.api.executor().jobs().is_empty(), "nothing ran");
    let statuses: Vec<u64> = d
        .denials()
        .iter()
        .map(|r| r["http_status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [421, 400, 400, 501]);
}

#[tokio::test]
async fn idle_connections_give_their_slot_up_when_asked_and_busy_ones_do_not() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let resolver: Arc<dyn IdentityResolver> =
        Arc::new(ByIp(BTreeMap::from([(peer.ip(), alice())])));
    let evict = Arc::new(tokio::sync::Notify::new());
    let open = || {
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve_connection_with(
            server,
            peer,
            resolver.clone(),
            d.api.router(),
            CancellationToken::new(),
            ConnectionOptions {
                timeouts: Timeouts::default(),
                evict_idle: Some(evict.clone()),
            },
        ));
        client
    };
    let ended = async |client: &mut tokio::io::DuplexStream| {
        let mut rest = Vec::new();
        tokio::time::timeout(LONG, client.read_to_end(&mut rest))
            .await
            .is_ok()
    };
    let health = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let mut idle = open();
    idle.write_all(health.as_bytes()).await.unwrap();
    read_until(&mut idle, "\"ok\"", 2).await;
    let mut busy = open();
    busy.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();

    evict.notify_one();
    assert!(ended(&mut idle).await, "the idle connection was not closed");
    busy.write_all(format!("Host: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_until(&mut busy, "\"ok\"", 2).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Asked while no connection is idle: the next one to fall idle goes,
    // after its answer is complete.
    evict.notify_one();
    assert!(
        ended(&mut busy).await,
        "the connection idle now was not closed"
    );
    evict.notify_one();
    let mut late = open();
    late.write_all(health.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(LONG, late.read_to_string(&mut out))
        .await
        .expect("closed after its answer")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with("\"status\":\"ok\"}"),
        "the whole answer came: {out}"
    );
    assert_eq!(out.matches("HTTP/1.1").count(), 1);
}

/// A connection served over a duplex pipe, as alice.
fn open_connection(d: &Stack) -> tokio::io::DuplexStream {
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let resolver: Arc<dyn IdentityResolver> =
        Arc::new(ByIp(BTreeMap::from([(peer.ip(), alice())])));
    let (client, server) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        CancellationToken::new(),
    ));
    client
}

#[tokio::test]
async fn a_peer_that_pipelines_gets_a_few_answers_then_the_connection_closes() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let mut client = open_connection(&d);
    let health = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    // 200 requests in one write, as a pipelining client sends them.
    client
        .write_all(health.repeat(200).as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(LONG, client.read_to_string(&mut out))
        .await
        .expect("the connection was not closed")
        .unwrap();
    // The first, then MAX_PIPELINED_REQUESTS pipelined behind it.
    let answers = out.matches("HTTP/1.1 200 OK").count() as u64;
    assert_eq!(answers, 1 + MAX_PIPELINED_REQUESTS, "{out}");
    let last = out.rsplit("HTTP/1.1 200 OK").next().unwrap();
    assert!(last.contains("connection: close"), "{last}");
    assert_eq!(out.matches("connection: close").count(), 1);
}

#[tokio::test]
async fn a_kept_alive_connection_serves_a_bounded_number_of_requests_then_closes() {
    let d = Stack::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let mut client = open_connection(&d);
    let health = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    // One request at a time, each after the last answer: never cut short
    // for pipelining.
    for n in 1..=MAX_REQUESTS_PER_CONNECTION {
        client.write_all(health.as_bytes()).await.unwrap();
        let answer = read_until(&mut client, "\"status\":\"ok\"}", 1).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK"),
            "request {n}: {answer}"
        );
        assert_eq!(
            answer.contains("connection: close"),
            n == MAX_REQUESTS_PER_CONNECTION,
            "request {n}"
        );
    }
    assert!(
        tokio::time::timeout(LONG, client.read_to_end(&mut Vec::new()))
            .await
            .is_ok(),
        "the connection was not closed"
    );
}
