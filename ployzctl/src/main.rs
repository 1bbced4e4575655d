//! ployzctl: one command per primitive. Parses the command line, talks to
//! ployzd over gRPC, prints text or `--json`, and exits with the status of the
//! failure's class. It depends on the API crate only, never on the daemon.

mod cli;
mod client;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;
use ployz_api::{ApiError, ErrorClass};

use crate::{cli::Cli, output::Output};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // Help and version are successes; everything else is a usage error.
            let code = if error.use_stderr() {
                ErrorClass::Usage.exit_code()
            } else {
                0
            };
            let _ = error.print();
            return exit(code);
        }
    };
    let output = Output::new(cli.global.json, cli.global.quiet);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = ApiError::new(
                ErrorClass::Internal,
                "runtime",
                format!("cannot start the async runtime: {error}"),
            );
            output.error(&error);
            return exit(error.class.exit_code());
        }
    };
    match runtime.block_on(commands::run(cli, &output)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            output.error(&error);
            exit(error.class.exit_code())
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
