//! The `waltail` binary: everything is in the library; see `waltail --help`.

fn main() -> std::process::ExitCode {
    waltail::cli::main()
}
