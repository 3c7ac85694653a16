fn main() -> std::process::ExitCode {
    // Test builds only (`--features failpoints`): faults named in
    // $FAILPOINTS, e.g. `spool-sync=20%5*return`.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    waltail::cli::main()
}
