// mimalloc: the proxy allocates small, short-lived buffers per request (header
// maps, bodies, futures); glibc's malloc spent several percent of the hub's
// CPU on them under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gatewire::cli::main()
}
