fn main() -> std::process::ExitCode {
    gatewire::cli::main()
}
