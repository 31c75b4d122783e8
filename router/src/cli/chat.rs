//! `orchard chat`: an interactive conversation that keeps its history and sends it as chat
//! input, so the worker applies the model's chat template.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use orchard_proto::v1 as pb;
use orchard_proto::v1::generate_request::Input;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::generate::{connect, describe_final, stream_to_stdout};
use super::{RouterAddr, SamplingArgs};

/// Arguments of `orchard chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Optional system message that starts the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Print the timings after each answer.
    #[arg(long)]
    pub timings: bool,
    #[command(flatten)]
    pub router: RouterAddr,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

fn message(role: &str, content: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: role.to_string(),
        content: content.to_string(),
    }
}

/// Runs `orchard chat` until EOF or `/exit`.
pub async fn run(args: ChatArgs) -> Result<()> {
    let mut client = connect(&args.router.router).await?;
    let system: Vec<pb::ChatMessage> = args.system.iter().map(|s| message("system", s)).collect();
    let mut history = system.clone();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    eprintln!(
        "chatting with {} (/reset clears the history, /exit or Ctrl-D quits)",
        args.router.router
    );
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next_line().await? else {
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = system.clone();
                continue;
            }
            _ => {}
        }
        history.push(message("user", line));
        let request = pb::GenerateRequest {
            model: args.sampling.model.clone(),
            input: Some(Input::Chat(pb::ChatMessages {
                messages: history.clone(),
            })),
            sampling: Some(args.sampling.to_proto()),
            ..Default::default()
        };
        match stream_to_stdout(&mut client, request).await {
            Ok((answer, final_info)) => {
                history.push(message("assistant", &answer));
                if let (true, Some(info)) = (args.timings, final_info) {
                    eprintln!("{}", describe_final(&info));
                }
            }
            Err(e) => {
                // The turn failed; forget it so the history stays a valid conversation.
                history.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}
