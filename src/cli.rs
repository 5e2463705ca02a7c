//! The terminal side of `hivesync sync` and `hivesync projects`: a progress bar on a
//! terminal, plain stage lines otherwise, and the exit codes the contract names.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use hivesync::client::{Client, ClientError, Update};
use hivesync::protocol::{SyncRecord, SyncStatus};
use indicatif::{ProgressBar, ProgressStyle};

const COMPLETED: u8 = 0;
const FAILED: u8 = 1;
const USAGE_OR_CONNECTION: u8 = 2;

fn give_up(err: &ClientError) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(USAGE_OR_CONNECTION)
}

pub async fn projects(server: &str, token: &str, json: bool) -> ExitCode {
    let client = match Client::new(server, token) {
        Ok(client) => client,
        Err(err) => return give_up(&err),
    };
    let projects = match client.projects().await {
        Ok(projects) => projects,
        Err(err) => return give_up(&err),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&projects).unwrap_or_default()
        );
        return ExitCode::from(COMPLETED);
    }
    if projects.is_empty() {
        eprintln!(
            "no projects yet (`hivesync register URL`, the dashboard or POST /api/v1/projects registers one)"
        );
        return ExitCode::from(COMPLETED);
    }
    println!("PROJECT\tNAME\tBRANCH\tLAST STATUS");
    for project in projects {
        println!(
            "{}\t{}\t{}\t{}",
            project.project_id,
            project.name,
            project.branch,
            project
                .last_status
                .map_or("never synced", SyncStatus::as_str)
        );
    }
    ExitCode::from(COMPLETED)
}

/// `hivesync register URL`: registers a project and prints its id alone on stdout
/// (so `PROJECT=$(hivesync register …)` keeps it), what was registered on stderr.
pub async fn register(
    server: &str,
    token: &str,
    repo_url: &str,
    name: Option<&str>,
    branch: Option<&str>,
) -> ExitCode {
    let client = match Client::new(server, token) {
        Ok(client) => client,
        Err(err) => return give_up(&err),
    };
    let fallback = repo_url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .map(|last| last.trim_end_matches(".git"))
        .filter(|last| !last.is_empty())
        .unwrap_or("project");
    let name = name.unwrap_or(fallback);
    match client.register(name, repo_url, branch).await {
        Ok(project) => {
            eprintln!(
                "registered '{}' ({} on {}); sync it with: hivesync sync {}",
                project.name, project.repo_url, project.branch, project.project_id
            );
            println!("{}", project.project_id);
            ExitCode::from(COMPLETED)
        }
        Err(err) => give_up(&err),
    }
}

/// How progress is shown: a bar on a terminal, else a line per stage (on stderr
/// when stdout carries `--json`).
enum Display {
    Bar(ProgressBar),
    Lines {
        json: bool,
        last: Option<SyncStatus>,
    },
}

impl Display {
    fn new(json: bool) -> Self {
        if !json && std::io::stdout().is_terminal() {
            let bar = ProgressBar::new(100);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:>14} [{bar:30}] {pos:>3}% {msg} ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            Display::Bar(bar)
        } else {
            Display::Lines { json, last: None }
        }
    }

    fn update(&mut self, update: Update<'_>) {
        match (self, update) {
            (Display::Bar(bar), Update::Accepted(accepted)) => {
                bar.set_prefix("queued");
                bar.set_message(format!("sync {}", accepted.sync_id));
            }
            (
                Display::Bar(bar),
                Update::Stage {
                    stage,
                    progress,
                    retry,
                },
            ) => {
                bar.set_prefix(stage.as_str());
                if let Some(progress) = progress {
                    bar.set_position(u64::from(progress.percent));
                    bar.set_message(format!(
                        "{} objects, {}",
                        progress.objects,
                        indicatif::HumanBytes(progress.bytes)
                    ));
                }
                if let Some(retry) = retry {
                    bar.set_message(format!(
                        "attempt {} failed ({}); retrying at {}",
                        retry.attempt,
                        retry.error.code.as_str(),
                        retry.retry_at
                    ));
                }
            }
            (Display::Bar(bar), Update::Reconnected(count)) => {
                bar.println(format!("connection dropped; resumed (reconnect {count})"));
            }
            (Display::Lines { json, last }, update) => {
                let json = *json;
                let text = match update {
                    Update::Accepted(accepted) => {
                        *last = Some(accepted.status);
                        Some(format!(
                            "sync {} {}",
                            accepted.sync_id,
                            if accepted.coalesced {
                                "joined (one was already waiting)"
                            } else {
                                "queued"
                            }
                        ))
                    }
                    Update::Stage {
                        stage,
                        retry: Some(retry),
                        ..
                    } => {
                        *last = Some(stage);
                        Some(format!(
                            "attempt {} failed: {}: {}; retrying at {}",
                            retry.attempt,
                            retry.error.code.as_str(),
                            retry.error.message,
                            retry.retry_at
                        ))
                    }
                    Update::Stage {
                        stage, progress, ..
                    } if *last != Some(stage) => {
                        *last = Some(stage);
                        Some(match progress {
                            Some(progress) => format!(
                                "{} {}% {} objects {}",
                                stage.as_str(),
                                progress.percent,
                                progress.objects,
                                indicatif::HumanBytes(progress.bytes)
                            ),
                            None => stage.as_str().to_owned(),
                        })
                    }
                    Update::Stage { .. } => None,
                    Update::Reconnected(count) => {
                        Some(format!("connection dropped; resumed (reconnect {count})"))
                    }
                };
                if let Some(text) = text {
                    if json {
                        eprintln!("{text}");
                    } else {
                        println!("{text}");
                    }
                }
            }
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

pub async fn sync(server: &str, token: &str, project_id: &str, json: bool) -> ExitCode {
    let client = match Client::new(server, token) {
        Ok(client) => client,
        Err(err) => return give_up(&err),
    };
    let mut display = Display::new(json);
    let result = client
        .sync_and_follow(project_id, |update| display.update(update))
        .await;
    display.finish();
    let record = match result {
        Ok(record) => record,
        Err(err) => return give_up(&err),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&record).unwrap_or_default()
        );
    } else {
        print_summary(&record);
    }
    if record.status == SyncStatus::Completed {
        ExitCode::from(COMPLETED)
    } else {
        ExitCode::from(FAILED)
    }
}

fn print_summary(record: &SyncRecord) {
    let took = match record.duration_ms {
        Some(ms) if ms < 1000 => format!(" in {ms} ms"),
        Some(ms) => format!(" in {:.1} s", ms as f64 / 1000.0),
        None => String::new(),
    };
    match (&record.status, &record.error) {
        (SyncStatus::Completed, _) => {
            let commit = record.commit.as_deref().unwrap_or("?");
            println!("completed: {commit}{took}");
            if let Some(changes) = record.changes {
                let commits = match changes.commits {
                    None => "first sync".to_owned(),
                    Some(n) if changes.commits_capped => format!("over {n} commits"),
                    Some(1) => "1 commit".to_owned(),
                    Some(n) => format!("{n} commits"),
                };
                let forced = if changes.forced {
                    ", history rewritten upstream"
                } else {
                    ""
                };
                let files = match changes.files_changed {
                    1 => "1 file".to_owned(),
                    n => format!("{n} files"),
                };
                println!("changes: {commits}, {files} changed{forced}");
            }
        }
        (_, Some(error)) => {
            eprintln!("failed: {}: {}{took}", error.code.as_str(), error.message);
        }
        (status, None) => eprintln!("ended as {}{took}", status.as_str()),
    }
}
