//! The `xero-sim` binary: serves the simulator on a loopback port until
//! interrupted.

use clap::Parser;

/// Xero simulator (loopback only).
#[derive(Parser, Debug)]
#[command(name = "xero-sim", version, about)]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port; overrides the config file).
    #[arg(long, env = "XERO_SIM_PORT")]
    port: Option<u16>,
    /// TOML configuration file (see `SimConfig`).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Seed for fault injection (overrides the config file).
    #[arg(long)]
    seed: Option<u64>,
    /// Approve the consent page at once for all the user's organisations.
    #[arg(long)]
    auto_approve: bool,
    /// Turn rate limits off.
    #[arg(long)]
    no_limits: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(p) => xero_sim::SimConfig::from_toml(&std::fs::read_to_string(p)?)?,
        None => xero_sim::SimConfig::default(),
    };
    if let Some(p) = args.port {
        config.port = p;
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    if args.auto_approve {
        config.auto_approve = Some(Vec::new());
    }
    if args.no_limits {
        config.limits.enabled = false;
    }
    let sim = xero_sim::Sim::start(config).await?;
    // Tests parse this line to find the port.
    println!("xero-sim listening on {}", sim.base_url());
    tracing::info!(base_url = %sim.base_url(), "xero-sim started");
    tokio::signal::ctrl_c().await?;
    sim.shutdown().await;
    Ok(())
}
