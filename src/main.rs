//! The `hivesync` binary: `serve`, `worker`, `ready`, `token`, and the client commands
//! `sync` and `projects`. Thin: everything is in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hivesync::app::{self, Application};
use hivesync::auth::ClientKind;
use hivesync::config::ConfigArgs;

mod cli;

/// mimalloc as the process's allocator with feature `mimalloc` (off by default: it
/// held more memory than glibc's malloc for a hub of many projects, measured by
/// `loadtest/run-all.sh DATE allocator`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hivesync",
    version,
    about = "HiveSync Hub: git mirrors with live sync progress"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// REST + WebSocket hub and the dashboard (with in-process workers when embedded).
    Serve(#[command(flatten)] ConfigArgs),
    /// A sync worker only; needs HIVESYNC_REDIS_URL.
    Worker(#[command(flatten)] ConfigArgs),
    /// Exits 0 when the configured engine answers and DATA_DIR is writable: a health
    /// check for worker containers, which serve no HTTP.
    Ready(#[command(flatten)] ConfigArgs),
    /// Requests a sync of a project and follows it live: exits 0 when it completed, 1
    /// when it failed, 2 on a usage or connection error.
    Sync {
        /// the project to sync
        project_id: String,
        #[command(flatten)]
        remote: Remote,
        /// print the final sync record as JSON instead of the summary
        #[arg(long)]
        json: bool,
    },
    /// Registers a repository as a project and prints its id (for
    /// `PROJECT=$(hivesync register URL)`).
    Register {
        /// the repository's URL (an allowed scheme: HIVESYNC_ALLOWED_SCHEMES)
        repo_url: String,
        /// the project's name [default: the URL's last part]
        #[arg(long)]
        name: Option<String>,
        /// the branch to mirror [default: main]
        #[arg(long)]
        branch: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Lists the token's projects (id, name, branch, last status).
    Projects {
        #[command(flatten)]
        remote: Remote,
        /// print the projects as JSON
        #[arg(long)]
        json: bool,
    },
    /// Mints a token with the configured key, for local use and tests.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long, value_enum, default_value = "desktop")]
        client: ClientKind,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// Which hub a client command talks to, and as whom.
#[derive(clap::Args)]
struct Remote {
    /// the hub's URL
    #[arg(long, env = "HIVESYNC_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// a token for the API (see `hivesync token`)
    #[arg(long, env = "HIVESYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Sync { .. } | Command::Projects { .. } | Command::Register { .. } = &cli.command
    {
        return client_command(cli.command);
    }
    if let Err(err) = hivesync::telemetry::init() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Worker(args) => worker(args).await,
            Command::Ready(args) => ready(args).await,
            Command::Token {
                sub,
                client,
                ttl,
                config,
            } => token(&sub, client, ttl, config),
            Command::Sync { .. } | Command::Projects { .. } | Command::Register { .. } => {
                Err("client commands run without the server runtime".into())
            }
        }
    });
    // a blocking read still running (it stops at its next budget check) must not hold
    // the process past its drain
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    hivesync::error::error_chain(err)
}

async fn serve(args: ConfigArgs) -> Result<(), String> {
    let config = args.into_config().map_err(|err| err.to_string())?;
    let application = Application::build(config)
        .await
        .map_err(|err| chain(&err))?;
    let addr = application.local_addr();
    let state = application.state().clone();
    tracing::info!(%addr, data_dir = %state.config.data_dir.display(), "hivesync serving");
    if let Some(secret) = &application.generated_secret {
        let token = state
            .auth
            .mint("dev", ClientKind::Desktop, Duration::from_secs(24 * 3600))
            .map_err(|err| chain(&err))?;
        // where the secret is, not the secret: a terminal's scrollback and a CI log
        // outlive the session
        println!(
            "No HIVESYNC_JWT_SECRET set: using the dev secret kept in {} ({}…); `hivesync token` run in this directory uses it too",
            state.config.data_dir.join("dev-jwt-secret").display(),
            secret.get(..6).unwrap_or_default()
        );
        println!("A token for user 'dev' (24h):");
        println!("  TOKEN={token}");
        println!("Dashboard:  http://{addr}/#token={token}");
        println!("API:        http://{addr}/api/v1/projects");
        println!("WebSocket:  ws://{addr}/api/v1/ws?access_token=$TOKEN");
    } else {
        println!("hivesync serving on http://{addr}");
    }
    application.run(hivesync::shutdown::on_signal()).await;
    Ok(())
}

async fn worker(args: ConfigArgs) -> Result<(), String> {
    let config = args.into_config().map_err(|err| err.to_string())?;
    if config.redis_url.is_none() {
        return Err("`hivesync worker` takes jobs from Redis: set HIVESYNC_REDIS_URL (without Redis, `hivesync serve` runs its own workers)".into());
    }
    println!("hivesync worker running {} sync workers", config.workers);
    app::run_workers(config, hivesync::shutdown::on_signal())
        .await
        .map_err(|err| chain(&err))
}

async fn ready(args: ConfigArgs) -> Result<(), String> {
    let mut config = args.into_config().map_err(|err| err.to_string())?;
    app::prepare_data_dir(&mut config).map_err(|err| chain(&err))?;
    let probe = config
        .data_dir
        .join(format!(".ready-{}", std::process::id()));
    std::fs::write(&probe, b"ok")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|err| format!("DATA_DIR is not writable: {err}"))?;
    let (engine, _) = app::open_engine(&config).await.map_err(|err| chain(&err))?;
    engine.store.ping().await.map_err(|err| chain(&err))?;
    println!("ready");
    Ok(())
}

fn token(sub: &str, client: ClientKind, ttl: Duration, args: ConfigArgs) -> Result<(), String> {
    let mut config = args.into_config().map_err(|err| err.to_string())?;
    app::prepare_data_dir(&mut config).map_err(|err| chain(&err))?;
    let dev_secret = config.data_dir.join("dev-jwt-secret");
    let existed = dev_secret.exists();
    let (auth, generated) = app::authenticator(&config).map_err(|err| chain(&err))?;
    // which key signs the token goes to stderr (stdout is the token alone): a hub
    // started elsewhere has another dev secret and refuses it
    if config.jwt_public_key.is_some() {
        // minting below says why it cannot
    } else if config.jwt_secret.is_some() {
        eprintln!("signed with HIVESYNC_JWT_SECRET");
    } else if generated.is_some() && !existed {
        eprintln!(
            "warning: no dev secret was in {}: made a new one there. A hub started in another directory (another HIVESYNC_DATA_DIR) has its own and will refuse this token; run this where the hub runs, or set HIVESYNC_JWT_SECRET for both",
            dev_secret.display()
        );
    } else {
        eprintln!(
            "signed with the dev secret kept in {}",
            dev_secret.display()
        );
    }
    let token = auth.mint(sub, client, ttl).map_err(|err| chain(&err))?;
    println!("{token}");
    Ok(())
}

/// `hivesync sync` and `hivesync projects`: a small runtime, no server logging (the
/// output is the command's own), and the exit code the command decides.
fn client_command(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        match command {
            Command::Sync {
                project_id,
                remote,
                json,
            } => {
                cli::sync(
                    &remote.server,
                    remote.token.as_deref().unwrap_or_default(),
                    &project_id,
                    json,
                )
                .await
            }
            Command::Projects { remote, json } => {
                cli::projects(
                    &remote.server,
                    remote.token.as_deref().unwrap_or_default(),
                    json,
                )
                .await
            }
            Command::Register {
                repo_url,
                name,
                branch,
                remote,
            } => {
                cli::register(
                    &remote.server,
                    remote.token.as_deref().unwrap_or_default(),
                    &repo_url,
                    name.as_deref(),
                    branch.as_deref(),
                )
                .await
            }
            _ => ExitCode::from(2),
        }
    })
}
