//! `qnode health`: a grpc.health.v1 client for container health checks.

use std::process::ExitCode;
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Flags of `qnode health`.
#[derive(clap::Args)]
pub struct HealthArgs {
    /// Node address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "QNODE_HEALTH_ADDR"
    )]
    addr: String,
    /// Service to check; empty means the whole node.
    #[arg(long, default_value = "")]
    service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3)]
    timeout_secs: u64,
}

pub fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(args.addr.clone())?
            .timeout(Duration::from_secs(args.timeout_secs))
            .connect_timeout(Duration::from_secs(args.timeout_secs))
            .connect()
            .await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await?;
        anyhow::Ok(reply.into_inner().status())
    })?;
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
