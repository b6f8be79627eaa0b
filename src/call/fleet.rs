//! The call on every selected node: at most `--parallel` at once, each
//! ending in a [`Report`] whatever happens to the others; then, for one
//! node, its notes (or JSON), for several, one JSON line per node as it
//! ends and the summary on stderr.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::cli::{Action, Plan, Selection};
use super::job::NodeCall;
use super::output::{Output, Pipe};
use super::reach::Tailnet;
use super::report::{EXIT_NEVER_RAN, Outcome, Report, fleet_exit, printable, summary};
use super::stop::Stop;
use super::target::{self, Target};

/// Runs `plan` over `tailnet`; the exit status.
pub async fn run(plan: &Plan, tailnet: Arc<Tailnet>, port: u16, stop: Stop) -> u8 {
    let status = match tailnet.status().await {
        Ok(st) => st,
        Err(e) => {
            eprintln!("tailkitd call: {e}");
            return EXIT_NEVER_RAN;
        }
    };
    let selected = target::select(&status, &plan.selection, port);
    if !selected.offline.is_empty() {
        eprintln!(
            "tailkitd call: skipping {} offline peer(s): {}",
            selected.offline.len(),
            selected.offline.join(", ")
        );
    }
    if selected.nodes.is_empty() {
        let what = match &plan.selection {
            Selection::Prefix(p) => format!("whose host name starts with {p:?}"),
            Selection::Tag(t) => format!("with tag {t:?}"),
            Selection::Targets(_) => "named".into(),
        };
        eprintln!(
            "tailkitd call: no online peer {what} (as seen by {})",
            tailnet.describe()
        );
        return EXIT_NEVER_RAN;
    }
    let names: Vec<String> = selected
        .nodes
        .iter()
        .map(|n| match n {
            Ok(t) => t.name.clone(),
            Err(u) => u.name.clone(),
        })
        .collect();
    let progress = plan.fleet && std::io::stderr().is_terminal();
    let (out, printer) = Output::start(names.clone(), plan.fleet, progress, stop.clone());
    let ticker = progress.then(|| {
        let out = out.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                out.progress().await;
            }
        })
    });

    let slots = Arc::new(Semaphore::new(plan.parallel));
    let mut tasks = JoinSet::new();
    let mut reports: Vec<Option<Report>> = vec![None; names.len()];
    for (index, node) in selected.nodes.into_iter().enumerate() {
        match node {
            Err(u) => {
                let r = Report::new(&u.name, Outcome::Unreachable, EXIT_NEVER_RAN, u.error);
                ended(&out, plan, &r).await;
                reports[index] = Some(r);
            }
            Ok(target) => {
                let call = NodeCall {
                    tailnet: tailnet.clone(),
                    target,
                    index,
                    out: out.clone(),
                    stop: stop.clone(),
                    timeout: plan.timeout,
                    live: !plan.json,
                };
                let (slots, plan) = (slots.clone(), plan.clone());
                tasks.spawn(async move {
                    let report = run_node(&call, &plan, &slots).await;
                    ended(&call.out, &plan, &report).await;
                    (index, report)
                });
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((index, report)) => reports[index] = Some(report),
            Err(e) => tracing::error!(error = %e, "a node's task failed"),
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let reports: Vec<Report> = reports
        .into_iter()
        .zip(&names)
        .map(|(r, name)| {
            r.unwrap_or_else(|| {
                Report::new(
                    name,
                    Outcome::Lost,
                    EXIT_NEVER_RAN,
                    "internal error: the task failed",
                )
            })
        })
        .collect();
    out.end_progress().await;
    let exit = if plan.fleet {
        out.text(Pipe::Stderr, summary(&reports)).await;
        fleet_exit(&reports, stop.exit())
    } else {
        single_notes(&out, plan, &reports[0]).await;
        reports[0].exit
    };
    drop(out);
    printer.finish().await;
    exit
}

async fn run_node(call: &NodeCall, plan: &Plan, slots: &Semaphore) -> Report {
    let counts = call.out.counts();
    let _slot = tokio::select! {
        slot = slots.acquire() => slot,
        exit = call.stop.stopped() => {
            return Report::new(&call.target.name, Outcome::Interrupted, exit, "not started: the call was stopped");
        }
    };
    counts.running.fetch_add(1, Ordering::Relaxed);
    call.out.progress().await;
    let report = call.run(&plan.action).await;
    counts.running.fetch_sub(1, Ordering::Relaxed);
    report
}

/// Counts a node's end; with several nodes, its JSON line or job id.
async fn ended(out: &Output, plan: &Plan, r: &Report) {
    let counts = out.counts();
    counts.done.fetch_add(1, Ordering::Relaxed);
    if r.exit != 0 {
        counts.failed.fetch_add(1, Ordering::Relaxed);
    }
    out.progress().await;
    if !plan.fleet {
        return;
    }
    if plan.json {
        out.text(Pipe::Stdout, r.json_line()).await;
    } else if let (Action::Start(_), Some(id)) = (&plan.action, &r.job_id) {
        out.text(Pipe::Stdout, format!("{}: {id}", r.node)).await;
    }
}

/// One node: the JSON, the job id, or what went wrong, as ssh would say it.
async fn single_notes(out: &Output, plan: &Plan, r: &Report) {
    if plan.json {
        let text = match (&plan.action, r.outcome, &r.job_id) {
            (Action::Start(_), Outcome::Started, Some(id)) => {
                serde_json::json!({"job_id": id, "status": "accepted"}).to_string()
            }
            _ => r.json_result(),
        };
        out.text(Pipe::Stdout, text).await;
    } else if let (Outcome::Started, Some(id)) = (r.outcome, &r.job_id) {
        out.text(Pipe::Stdout, id.clone()).await;
    }
    let mut notes = Vec::new();
    if let Action::Cancel(id) = &plan.action
        && r.result.is_some()
    {
        let status = r
            .result
            .as_ref()
            .map_or("", |v| v["status"].as_str().unwrap_or(""));
        notes.push(format!("job {id} is {status}"));
    } else if let Some(e) = &r.error {
        notes.push(e.clone());
    }
    for pipe in r.truncated() {
        notes.push(format!("{pipe} was truncated at the daemon's output cap"));
    }
    for note in notes {
        let note = printable(&note);
        out.text(Pipe::Stderr, format!("tailkitd call: {}: {note}", r.node))
            .await;
    }
    if let Some(hint) = &r.hint {
        let hint = printable(hint);
        out.text(Pipe::Stderr, format!("tailkitd call: hint: {hint}"))
            .await;
    }
}

/// Resolves one TARGET for `tools`.
pub async fn resolve_one(tailnet: &Tailnet, name: &str, port: u16) -> Result<Target, String> {
    let status = tailnet.status().await.map_err(|e| e.to_string())?;
    let mut sel = target::select(&status, &Selection::Targets(vec![name.to_string()]), port);
    match sel.nodes.pop() {
        Some(Ok(t)) => Ok(t),
        Some(Err(u)) => Err(u.error),
        None => Err(format!("peer {name} not found")),
    }
}
