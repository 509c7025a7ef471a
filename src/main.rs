//! The `qnode` binary: parses the command line and hands over to the command.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
