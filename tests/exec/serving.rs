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
