//! One node's call, start to end: `POST /exec/{tool}/{cmd}?stream=true`
//! and its live events (SPEC §7), printed as they come; a broken stream
//! resumed with `Last-Event-ID`; the final job result read once the
//! terminal event came. A daemon that answers the stream request with a
//! plain `202` (the Go daemon, tailkitd before live output) is polled with
//! `GET ?wait=` instead and its output printed at the end. A stop or the
//! per-node deadline cancels the job (`DELETE`), or, when following a job
//! started elsewhere, only stops following.

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until};

use super::cli::{Action, Request, is_job_id};
use super::output::{Output, Pipe};
use super::reach::{Conn, Tailnet};
use super::report::{EXIT_NEVER_RAN, EXIT_TIMED_OUT, Halt, Outcome, Report};
use super::stop::Stop;
use super::target::Target;
use crate::client::sse::Item;
use crate::client::{self, Call, EventStream, Opened, Response};

/// How long a connection to a node may take.
const DIAL: Duration = Duration::from_secs(20);
/// How long the answer's head may take (the event stream then takes its
/// time).
const HEAD: Duration = Duration::from_secs(30);
/// A stream silent this long (no event, no heartbeat: the daemon sends one
/// every 15 s) is taken for broken and resumed.
const IDLE: Duration = Duration::from_secs(60);
/// The long poll of a daemon that does not stream.
const POLL: &str = "30s";
const POLL_ANSWER: Duration = Duration::from_secs(45);
/// Polls at most this often.
const MIN_POLL: Duration = Duration::from_secs(1);
/// A DELETE waits for the job to die (the daemon's kill grace and more).
const CANCEL: Duration = Duration::from_secs(30);
/// Attempts after a failure (a `429`, a broken stream, a failed poll).
const ATTEMPTS: u32 = 5;

/// Whether a stop cancels the job or only stops following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnHalt {
    Cancel,
    Detach,
}

/// One node's call and what it needs.
pub struct NodeCall {
    /// The way onto the tailnet.
    pub tailnet: Arc<Tailnet>,
    /// The node.
    pub target: Target,
    /// Its index among the call's nodes (for the output's prefix).
    pub index: usize,
    /// The printer.
    pub out: Output,
    /// The call's stop.
    pub stop: Stop,
    /// `--timeout`, from when the node's call began.
    pub timeout: Option<Duration>,
    /// Print the remote output (false with `--json`: it is in the result).
    pub live: bool,
}

/// Lines already printed, so that a switch to polling prints the rest.
#[derive(Debug, Default)]
struct Printed {
    stdout: usize,
    stderr: usize,
}

impl NodeCall {
    /// Does `action` on the node; never fails: everything ends in a
    /// [`Report`].
    pub async fn run(&self, action: &Action) -> Report {
        let started = Instant::now();
        let deadline = self.timeout.map(|t| started + t);
        let mut report = match action {
            Action::Run(req) => self.run_job(req, deadline).await,
            Action::Start(req) => self.start_job(req).await,
            Action::Follow(id) => self.follow_job(id, deadline).await,
            Action::Cancel(id) => self.cancel_job(id).await,
        };
        report.duration = started.elapsed();
        report
    }

    fn name(&self) -> &str {
        &self.target.name
    }

    async fn halted(&self, deadline: Option<Instant>) -> Halt {
        let until = async {
            match deadline {
                Some(d) => sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            exit = self.stop.stopped() => Halt::Stopped(exit),
            () = until => Halt::Deadline,
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        self.tailnet.dial(self.target.addr, DIAL).await
    }

    async fn send(&self, call: Call<'_>, timeout: Duration) -> Result<Response, String> {
        let conn = self.connect().await?;
        client::send(conn, call, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn open(&self, call: Call<'_>) -> Result<Opened, String> {
        let conn = self.connect().await?;
        client::open_stream(conn, call, HEAD)
            .await
            .map_err(|e| e.to_string())
    }

    fn unreachable(&self, error: String) -> Report {
        Report::new(
            self.name(),
            Outcome::Unreachable,
            EXIT_NEVER_RAN,
            format!("cannot reach {}: {error}", self.target.addr),
        )
    }

    fn refused(&self, resp: &Response) -> Report {
        let error = resp.json["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                let text: String = resp.text.trim().chars().take(300).collect();
                format!(
                    "{}{}{text}",
                    resp.status,
                    if text.is_empty() { "" } else { ": " }
                )
            });
        let mut r = Report::new(self.name(), Outcome::Refused, EXIT_NEVER_RAN, error);
        r.hint = resp.json["hint"].as_str().map(str::to_string);
        r.http_status = Some(resp.status.as_u16());
        r
    }

    fn lost(&self, job: Option<&str>, error: String) -> Report {
        let mut r = Report::new(self.name(), Outcome::Lost, EXIT_NEVER_RAN, error);
        r.job_id = job.map(str::to_string);
        r
    }

    /// `POST ...?stream=true`, then the stream, or polling.
    async fn run_job(&self, req: &Request, deadline: Option<Instant>) -> Report {
        let path = format!("{}?stream=true", req.path());
        let body = Value::Object(req.args.clone());
        let mut busy = 0;
        loop {
            // A node the deadline passes for before it answers the dial
            // is unreachable: nothing ran there.
            let dial_for = deadline.map_or(DIAL, |d| {
                d.saturating_duration_since(Instant::now()).min(DIAL)
            });
            let conn = tokio::select! {
                c = self.tailnet.dial(self.target.addr, dial_for) => c,
                exit = self.stop.stopped() => {
                    return self.on_halt(None, Halt::Stopped(exit), OnHalt::Cancel).await;
                }
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => return self.unreachable(e),
            };
            let mut call = Call::post_json(&self.target.host, &path, &body);
            call.headers.push(("Accept", "text/event-stream"));
            // Not cut short by a stop: the answer names the job to cancel.
            let resp = match client::open_stream(conn, call, HEAD).await {
                Ok(Opened::Events(events)) => {
                    return self
                        .follow_stream(events, None, OnHalt::Cancel, deadline)
                        .await;
                }
                Ok(Opened::Answer(resp)) => resp,
                Err(e) => {
                    return self.lost(
                        None,
                        format!(
                            "the request was sent but not answered ({e}); the job may have started"
                        ),
                    );
                }
            };
            match resp.status {
                StatusCode::ACCEPTED => match job_id_of(&resp.json) {
                    // A daemon without live output.
                    Some(id) => {
                        return self
                            .poll(&id, OnHalt::Cancel, deadline, &mut Printed::default())
                            .await;
                    }
                    None => {
                        return self.lost(
                            None,
                            format!(
                                "the daemon accepted a job without a usable id: {}",
                                resp.text.trim()
                            ),
                        );
                    }
                },
                StatusCode::OK if is_terminal(&resp.json) => {
                    self.print_result(&resp.json, &mut Printed::default()).await;
                    return Report::from_result(self.name(), resp.json, None);
                }
                StatusCode::TOO_MANY_REQUESTS if busy < ATTEMPTS => {
                    busy += 1;
                    let wait = Duration::from_secs(resp.retry_after.unwrap_or(1).clamp(1, 5));
                    tokio::select! {
                        () = sleep(wait) => {}
                        h = self.halted(deadline) => return self.on_halt(None, h, OnHalt::Cancel).await,
                    }
                }
                _ => return self.refused(&resp),
            }
        }
    }

    /// `--async`: a plain POST; the job id.
    async fn start_job(&self, req: &Request) -> Report {
        let body = Value::Object(req.args.clone());
        let path = req.path();
        let mut busy = 0;
        loop {
            let resp = match self
                .send(Call::post_json(&self.target.host, &path, &body), HEAD)
                .await
            {
                Ok(r) => r,
                Err(e) => return self.unreachable(e),
            };
            match resp.status {
                StatusCode::ACCEPTED if job_id_of(&resp.json).is_some() => {
                    let mut r = Report::new(self.name(), Outcome::Started, 0, "");
                    r.job_id = job_id_of(&resp.json);
                    return r;
                }
                StatusCode::TOO_MANY_REQUESTS if busy < ATTEMPTS => {
                    busy += 1;
                    let wait = resp.retry_after.unwrap_or(1).clamp(1, 5);
                    tokio::select! {
                        () = sleep(Duration::from_secs(wait)) => {}
                        exit = self.stop.stopped() => {
                            return Report::new(self.name(), Outcome::Interrupted, exit, "stopped before the job started");
                        }
                    }
                }
                _ => return self.refused(&resp),
            }
        }
    }

    /// `--follow`: the job's events from the first.
    async fn follow_job(&self, id: &str, deadline: Option<Instant>) -> Report {
        let path = format!("/exec/jobs/{id}?stream=true");
        let mut call = Call::get(&self.target.host, &path);
        call.headers.push(("Accept", "text/event-stream"));
        let opened = tokio::select! {
            o = self.open(call) => o,
            h = self.halted(deadline) => return self.on_halt(Some(id), h, OnHalt::Detach).await,
        };
        match opened {
            Ok(Opened::Events(events)) => {
                self.follow_stream(events, Some(id.to_string()), OnHalt::Detach, deadline)
                    .await
            }
            Ok(Opened::Answer(resp)) if resp.status == StatusCode::OK => {
                self.poll(id, OnHalt::Detach, deadline, &mut Printed::default())
                    .await
            }
            Ok(Opened::Answer(resp)) => self.refused(&resp),
            Err(e) => self.unreachable(e),
        }
    }

    /// `--cancel`: `DELETE`; exit 0 when the job is over.
    async fn cancel_job(&self, id: &str) -> Report {
        let path = format!("/exec/jobs/{id}");
        match self
            .send(Call::delete(&self.target.host, &path), CANCEL)
            .await
        {
            Ok(resp) if resp.status == StatusCode::OK && is_terminal(&resp.json) => {
                let mut r = Report::from_result(self.name(), resp.json, None);
                r.exit = 0;
                r
            }
            Ok(resp) => self.refused(&resp),
            Err(e) => self.unreachable(e),
        }
    }

    /// Reads events until the terminal one, resuming a broken stream.
    async fn follow_stream(
        &self,
        mut events: EventStream,
        mut job: Option<String>,
        on_halt: OnHalt,
        deadline: Option<Instant>,
    ) -> Report {
        let mut last = 0u64;
        // Reopened streams in a row that broke before bringing anything
        // (not even a heartbeat) end like a stream that cannot reopen.
        let (mut heard, mut stalls) = (false, 0);
        let mut printed = Printed::default();
        loop {
            // Until an event named the job there is nothing to cancel: a
            // stop waits for that first event (it comes at once).
            let next = tokio::select! {
                n = tokio::time::timeout(IDLE, events.next()) => n,
                h = self.halted(deadline), if job.is_some() => {
                    return self.on_halt(job.as_deref(), h, on_halt).await;
                }
            };
            if matches!(next, Ok(Ok(Some(_)))) {
                heard = true;
            }
            let broken = match next {
                Ok(Ok(Some(Item::Event(ev)))) => {
                    if let Some(id) = ev.id {
                        last = id;
                    }
                    let data = ev.json();
                    if job.is_none() {
                        job = job_id_of(&data);
                    }
                    match ev.name.as_str() {
                        "job.stdout" => self.print_line(Pipe::Stdout, &data, &mut printed).await,
                        "job.stderr" => self.print_line(Pipe::Stderr, &data, &mut printed).await,
                        "job.completed" | "job.failed" => {
                            return self.finish(job.as_deref(), &ev.name, data).await;
                        }
                        "error" => {
                            // The sequence cannot go on; the result can still be read.
                            let why = data["error"].as_str().unwrap_or("no reason given");
                            tracing::debug!(node = self.name(), why, "event stream ended early");
                            let Some(id) = job.as_deref() else {
                                return self.lost(None, format!("the event stream failed: {why}"));
                            };
                            return self.poll(id, on_halt, deadline, &mut printed).await;
                        }
                        _ => {}
                    }
                    continue;
                }
                Ok(Ok(Some(Item::Comment(_)))) => continue,
                Ok(Ok(None)) => "the stream ended before the job did".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no event or heartbeat for {IDLE:?}"),
            };
            let Some(id) = job.clone() else {
                return self.lost(
                    None,
                    format!("the event stream broke before naming the job: {broken}"),
                );
            };
            tracing::debug!(node = self.name(), %broken, last, "resuming the event stream");
            stalls = if heard { 0 } else { stalls + 1 };
            heard = false;
            if stalls >= ATTEMPTS {
                return self.lost(
                    Some(&id),
                    format!("the event stream keeps breaking without progress: {broken}"),
                );
            }
            match self.resume(&id, last, deadline, &broken).await {
                Resumed::Events(e) => events = *e,
                Resumed::Plain => return self.poll(&id, on_halt, deadline, &mut printed).await,
                Resumed::Halted(h) => return self.on_halt(Some(&id), h, on_halt).await,
                Resumed::Failed(why) => return self.lost(Some(&id), why),
            }
        }
    }

    /// Opens the stream again after event `last`, a few times.
    async fn resume(
        &self,
        id: &str,
        last: u64,
        deadline: Option<Instant>,
        broken: &str,
    ) -> Resumed {
        let path = format!("/exec/jobs/{id}?stream=true");
        let last_id = last.to_string();
        let mut why = broken.to_string();
        for attempt in 0..ATTEMPTS {
            tokio::select! {
                () = sleep(backoff(attempt)) => {}
                h = self.halted(deadline) => return Resumed::Halted(h),
            }
            let mut call = Call::get(&self.target.host, &path);
            call.headers.push(("Accept", "text/event-stream"));
            call.headers.push(("Last-Event-ID", &last_id));
            let opened = tokio::select! {
                o = self.open(call) => o,
                h = self.halted(deadline) => return Resumed::Halted(h),
            };
            match opened {
                Ok(Opened::Events(e)) => return Resumed::Events(Box::new(e)),
                Ok(Opened::Answer(r)) if r.status == StatusCode::OK => return Resumed::Plain,
                Ok(Opened::Answer(r)) if r.status == StatusCode::NOT_FOUND => {
                    return Resumed::Failed(format!(
                        "the event stream broke ({broken}) and the daemon no longer knows job {id}"
                    ));
                }
                Ok(Opened::Answer(r)) => why = format!("{}: {}", r.status, r.text.trim()),
                Err(e) => why = e,
            }
        }
        Resumed::Failed(format!(
            "the event stream broke and could not be resumed: {why}"
        ))
    }

    /// `GET ?wait=` until the job is over; prints the output not printed yet.
    async fn poll(
        &self,
        id: &str,
        on_halt: OnHalt,
        deadline: Option<Instant>,
        printed: &mut Printed,
    ) -> Report {
        let path = format!("/exec/jobs/{id}?wait={POLL}");
        let mut failures = 0;
        loop {
            let asked = Instant::now();
            let got = tokio::select! {
                r = self.send(Call::get(&self.target.host, &path), POLL_ANSWER) => r,
                h = self.halted(deadline) => return self.on_halt(Some(id), h, on_halt).await,
            };
            let why = match got {
                Ok(r) if r.status == StatusCode::OK && is_terminal(&r.json) => {
                    self.print_result(&r.json, printed).await;
                    return Report::from_result(self.name(), r.json, None);
                }
                Ok(r) if r.status == StatusCode::OK => {
                    // A daemon that does not hold the poll is asked once a
                    // second, not in a tight loop.
                    failures = 0;
                    tokio::select! {
                        () = sleep_until(asked + MIN_POLL) => {}
                        h = self.halted(deadline) => return self.on_halt(Some(id), h, on_halt).await,
                    }
                    continue;
                }
                Ok(r) if r.status == StatusCode::NOT_FOUND => {
                    return self.lost(Some(id), format!("the daemon no longer knows job {id}"));
                }
                Ok(r) => format!("{}: {}", r.status, r.text.trim()),
                Err(e) => e,
            };
            failures += 1;
            if failures >= ATTEMPTS {
                return self.lost(Some(id), format!("waiting for job {id}: {why}"));
            }
            tokio::select! {
                () = sleep(backoff(failures)) => {}
                h = self.halted(deadline) => return self.on_halt(Some(id), h, on_halt).await,
            }
        }
    }

    /// After the terminal event: the job's full result (the event's data
    /// when it cannot be read).
    async fn finish(&self, job: Option<&str>, event: &str, data: Value) -> Report {
        let Some(id) = job else {
            return Report::from_result(self.name(), from_event(event, &data), None);
        };
        let path = format!("/exec/jobs/{id}?wait=10s");
        match self.send(Call::get(&self.target.host, &path), HEAD).await {
            Ok(r) if r.status == StatusCode::OK && is_terminal(&r.json) => {
                Report::from_result(self.name(), r.json, None)
            }
            other => {
                tracing::debug!(
                    node = self.name(),
                    ?other,
                    "no final result; using the terminal event"
                );
                Report::from_result(self.name(), from_event(event, &data), None)
            }
        }
    }

    /// Stopped: cancels the job (`DELETE`) or leaves it running.
    async fn on_halt(&self, job: Option<&str>, halt: Halt, on_halt: OnHalt) -> Report {
        let (outcome, exit) = match halt {
            Halt::Deadline => (Outcome::TimedOut, EXIT_TIMED_OUT),
            Halt::Stopped(exit) => (Outcome::Interrupted, exit),
        };
        let Some(id) = job else {
            return Report::new(self.name(), outcome, exit, "stopped before the job started");
        };
        if on_halt == OnHalt::Detach {
            let mut r = Report::new(
                self.name(),
                outcome,
                exit,
                format!("stopped following; job {id} keeps running (--cancel {id} stops it)"),
            );
            r.job_id = Some(id.to_string());
            return r;
        }
        let path = format!("/exec/jobs/{id}");
        match self
            .send(Call::delete(&self.target.host, &path), CANCEL)
            .await
        {
            Ok(r) if r.status == StatusCode::OK && is_terminal(&r.json) => {
                Report::from_result(self.name(), r.json, Some(halt))
            }
            Ok(r) => {
                let mut rep = Report::new(
                    self.name(),
                    outcome,
                    exit,
                    format!("could not cancel job {id}: {}: {}", r.status, r.text.trim()),
                );
                rep.job_id = Some(id.to_string());
                rep
            }
            Err(e) => {
                let mut rep = Report::new(
                    self.name(),
                    outcome,
                    exit,
                    format!("could not cancel job {id}, it may still run: {e}"),
                );
                rep.job_id = Some(id.to_string());
                rep
            }
        }
    }

    async fn print_line(&self, pipe: Pipe, data: &Value, printed: &mut Printed) {
        match pipe {
            Pipe::Stdout => printed.stdout += 1,
            Pipe::Stderr => printed.stderr += 1,
        }
        if self.live {
            let line = data["line"].as_str().unwrap_or_default().to_string();
            self.out.line(self.index, pipe, line).await;
        }
    }

    /// Prints a result's output, past the lines already printed: as it is
    /// for one node, line by line (prefixed) for several.
    async fn print_result(&self, result: &Value, printed: &mut Printed) {
        if !self.live {
            return;
        }
        for (pipe, key, skip) in [
            (Pipe::Stdout, "stdout", printed.stdout),
            (Pipe::Stderr, "stderr", printed.stderr),
        ] {
            let text = result[key].as_str().unwrap_or_default();
            if text.is_empty() {
                continue;
            }
            if skip == 0 && self.out.is_raw() {
                self.out.raw(pipe, text.as_bytes().to_vec()).await;
                continue;
            }
            for line in text.lines().skip(skip) {
                self.out.line(self.index, pipe, line.to_string()).await;
            }
        }
    }
}

/// What resuming a stream came to.
enum Resumed {
    Events(Box<EventStream>),
    /// The daemon answered with a plain result: poll.
    Plain,
    Halted(Halt),
    Failed(String),
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(4))
}

/// The `job_id` of an answer or event, if it is one to put in a path.
fn job_id_of(v: &Value) -> Option<String> {
    v["job_id"]
        .as_str()
        .filter(|id| is_job_id(id))
        .map(str::to_string)
}

fn is_terminal(result: &Value) -> bool {
    matches!(
        result["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

/// A job result from a terminal event (`job.completed` / `job.failed`).
fn from_event(event: &str, data: &Value) -> Value {
    let error = data["error"].as_str().unwrap_or_default();
    let status = if event == "job.completed" {
        "completed"
    } else if error.starts_with("cancelled") {
        "cancelled"
    } else {
        "failed"
    };
    let mut r = json!({
        "job_id": data["job_id"],
        "status": status,
        "exit_code": data["exit_code"].as_i64().unwrap_or(-1),
    });
    for k in ["error", "signal", "stdout_truncated", "stderr_truncated"] {
        if !data[k].is_null() {
            r[k] = data[k].clone();
        }
    }
    r
}

#[cfg(test)]
mod tests;
