//! `orchard generate "prompt"`: streams tokens to stdout, then the final message's timings.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use orchard_proto::v1 as pb;
use orchard_proto::v1::generate_request::Input;
use orchard_proto::v1::orchard_client::OrchardClient;
use tonic::transport::Channel;

use super::{RouterAddr, SamplingArgs};

/// Arguments of `orchard generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt (raw text, no chat template).
    pub prompt: String,
    #[command(flatten)]
    pub router: RouterAddr,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Connects to the router.
pub async fn connect(addr: &str) -> Result<OrchardClient<Channel>> {
    let channel = Channel::from_shared(addr.to_string())
        .with_context(|| format!("bad router address `{addr}`"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the router at {addr} (is `orchard up` running?)"))?;
    Ok(OrchardClient::new(channel))
}

/// Sends `request`, echoes text to stdout as it arrives, returns the text and final info.
pub async fn stream_to_stdout(
    client: &mut OrchardClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<(String, Option<pb::FinalInfo>)> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    let mut final_info = None;
    while let Some(msg) = stream.message().await? {
        print!("{}", msg.text);
        stdout.flush()?;
        text.push_str(&msg.text);
        if msg.r#final.is_some() {
            final_info = msg.r#final;
        }
    }
    println!();
    Ok((text, final_info))
}

/// One line summarising the final message, for stderr.
pub fn describe_final(info: &pb::FinalInfo) -> String {
    let finish = info.finish_reason().as_str_name();
    let usage = info.usage.unwrap_or_default();
    let Some(t) = info.timings.as_ref() else {
        return format!("[{finish}, {} tokens, no timings]", usage.completion_tokens);
    };
    format!(
        "[worker {}, finish {finish}, {} prompt + {} completion tokens ({} cached), \
         ttft {:.3}s (router {:.3}s), tpot {:.4}s, e2e {:.3}s (router {:.3}s), queue {:.3}s, retries {}]",
        t.worker_id,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_tokens,
        t.ttft_s,
        t.router_ttft_s,
        t.mean_tpot_s,
        t.e2e_s,
        t.router_e2e_s,
        t.queue_s,
        t.retries
    )
}

/// Runs `orchard generate`.
pub async fn run(args: GenerateArgs) -> Result<()> {
    let mut client = connect(&args.router.router).await?;
    let request = pb::GenerateRequest {
        model: args.sampling.model.clone(),
        input: Some(Input::Prompt(args.prompt)),
        sampling: Some(args.sampling.to_proto()),
        ..Default::default()
    };
    let (_, final_info) = stream_to_stdout(&mut client, request).await?;
    match final_info {
        Some(info) => eprintln!("{}", describe_final(&info)),
        None => eprintln!("[stream ended without a final message]"),
    }
    Ok(())
}
