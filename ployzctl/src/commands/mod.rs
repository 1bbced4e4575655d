//! One module per command group. Each command validates its input, calls the
//! daemon, and prints a result through [`Output`].

mod daemon;
mod deploy;
mod docs;
mod machine;
mod machine_add;
mod mesh;
mod op;
mod routes;
mod status;

use std::{path::PathBuf, time::Duration};

use ployz_api::ApiError;

use crate::{
    cli::{Cli, Command},
    client::{self, Client},
    output::Output,
};

/// Requests that only read answer quickly or not at all.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Mutating operations may start processes (NATS) and wait for them.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(120);

/// What every command needs: where the daemon is and how to print.
pub struct Context<'a> {
    pub socket: PathBuf,
    pub output: &'a Output,
}

impl Context<'_> {
    async fn client(&self, timeout: Duration) -> Result<Client, ApiError> {
        client::connect(&self.socket, timeout).await
    }

    fn call_error(&self, status: tonic::Status) -> ApiError {
        client::call_error(&self.socket, status)
    }
}

pub async fn run(cli: Cli, output: &Output) -> Result<(), ApiError> {
    let context = Context {
        socket: cli
            .global
            .socket
            .clone()
            .unwrap_or_else(ployz_api::paths::default_socket),
        output,
    };
    match cli.command {
        Command::Status => status::status(&context).await,
        Command::Daemon(command) => daemon::run(&context, command).await,
        Command::Mesh(command) => mesh::run(&context, command).await,
        Command::Machine(command) => machine::run(&context, command).await,
        Command::Deploy(args) => deploy::run(&context, args).await,
        Command::Op(command) => op::run(&context, command).await,
        Command::Routes(command) => routes::run(&context, command).await,
        Command::Completions { shell } => docs::completions(shell),
        Command::Man { out_dir } => docs::man(&context, &out_dir),
    }
}
