fn main() -> std::process::ExitCode {
    twinvm::cli::main()
}
