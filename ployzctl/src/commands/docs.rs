//! Shell completions and man pages, generated from the clap definitions so
//! they never disagree with the binary.

use std::path::Path;

use clap::CommandFactory;
use ployz_api::{ApiError, ErrorClass};

use super::Context;
use crate::cli::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<(), ApiError> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "ployzctl", &mut std::io::stdout());
    Ok(())
}

pub fn man(context: &Context<'_>, out_dir: &Path) -> Result<(), ApiError> {
    let io_error = |error: std::io::Error| {
        ApiError::new(
            ErrorClass::Internal,
            "man_write_failed",
            format!("cannot write man pages to {}: {error}", out_dir.display()),
        )
    };
    std::fs::create_dir_all(out_dir).map_err(io_error)?;
    clap_mangen::generate_to(Cli::command(), out_dir).map_err(io_error)?;
    let mut pages: Vec<String> = std::fs::read_dir(out_dir)
        .map_err(io_error)?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ployzctl") && name.ends_with(".1"))
        .collect();
    pages.sort();
    context.output.emit(
        &serde_json::json!({ "out_dir": out_dir, "pages": pages }),
        || format!("wrote {} man pages to {}\n", pages.len(), out_dir.display()),
    );
    Ok(())
}
