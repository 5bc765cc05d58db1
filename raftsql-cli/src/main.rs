fn main() -> std::process::ExitCode {
    raftsql_cli::main()
}
