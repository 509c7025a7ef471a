//! `qnode admin`: a `qnode.v1.Admin` client, so operators need nothing but the node's own binary
//! (e.g. `docker compose exec standby qnode admin activate`).

use std::process::ExitCode;
use std::time::Duration;

use qnode::grpc::proto::admin_client::AdminClient;
use qnode::grpc::proto::{self, NodeStatusResponse};
use tonic::transport::Channel;

/// Flags of `qnode admin`.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// Node address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "QNODE_ADMIN_ADDR"
    )]
    addr: String,
    /// Admin key, sent as `authorization: Bearer <KEY>`.
    #[arg(long, env = "QNODE_ADMIN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Give up after this many seconds (LoadModel and Warmup may need more).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// The node's state, role and models.
    Status,
    /// Standby → ready: take traffic.
    Activate,
    /// Ready → standby: take no new traffic, stay warm.
    Standby,
    /// Finish in-flight calls and exit.
    Drain,
    /// Load, warm and serve one more model.
    Load {
        /// Manifest id, GGUF path or `hf:` spec.
        id: String,
        /// Instances.
        #[arg(long)]
        instances: Option<u32>,
        /// Threads per instance.
        #[arg(long)]
        threads_per_instance: Option<u32>,
    },
    /// Stop serving a model.
    Unload {
        /// Model id as listed.
        id: String,
    },
    /// Warm every model again and preload hot answers.
    Warmup {
        /// Hot answers to preload from Redis.
        #[arg(long, default_value_t = 0)]
        hot_answers: u32,
    },
}

fn request<T>(message: T, key: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse()?);
    }
    Ok(request)
}

fn print_status(status: &NodeStatusResponse) {
    println!(
        "state: {}\nrole: {}\nin_flight: {}\nwarm_after_ms: {}",
        status.state().as_str_name(),
        status.role().as_str_name(),
        status.in_flight,
        status.warm_after_ms
    );
    for m in &status.models {
        println!(
            "model: {} {} {} x{} {}",
            m.id,
            m.architecture,
            m.quant_type,
            m.instances,
            m.state().as_str_name()
        );
    }
}

async fn call(args: AdminArgs) -> anyhow::Result<()> {
    let channel = Channel::from_shared(args.addr.clone())?
        .timeout(Duration::from_secs(args.timeout_secs))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = AdminClient::new(channel);
    let key = args.api_key.as_deref();
    match args.action {
        Action::Status => print_status(
            &client
                .node_status(request(proto::NodeStatusRequest {}, key)?)
                .await?
                .into_inner(),
        ),
        Action::Activate => print_status(
            &client
                .activate(request(proto::ActivateRequest {}, key)?)
                .await?
                .into_inner(),
        ),
        Action::Standby => print_status(
            &client
                .standby(request(proto::StandbyRequest {}, key)?)
                .await?
                .into_inner(),
        ),
        Action::Drain => print_status(
            &client
                .drain(request(proto::DrainRequest {}, key)?)
                .await?
                .into_inner(),
        ),
        Action::Load {
            id,
            instances,
            threads_per_instance,
        } => {
            let message = proto::LoadModelRequest {
                id,
                instances,
                threads_per_instance,
                ..Default::default()
            };
            let m = client
                .load_model(request(message, key)?)
                .await?
                .into_inner();
            println!(
                "loaded: {} {} {}",
                m.id,
                m.architecture,
                m.state().as_str_name()
            );
        }
        Action::Unload { id } => {
            let message = proto::UnloadModelRequest { id };
            let r = client
                .unload_model(request(message, key)?)
                .await?
                .into_inner();
            println!("unloaded; queued requests refused: {}", r.refused_queued);
        }
        Action::Warmup { hot_answers } => {
            let message = proto::WarmupRequest {
                models: Vec::new(),
                hot_answers,
            };
            let r = client.warmup(request(message, key)?).await?.into_inner();
            println!(
                "warm-up generations: {}, hot answers loaded: {}, took {} ms",
                r.generations,
                r.hot_answers_loaded,
                r.elapsed_us / 1000
            );
        }
    }
    Ok(())
}

pub fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(call(args)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => match e.downcast_ref::<tonic::Status>() {
            Some(status) => {
                eprintln!("qnode admin: {:?}: {}", status.code(), status.message());
                Ok(ExitCode::FAILURE)
            }
            None => Err(e),
        },
    }
}
