//! The `imagestream` binary: see the library's `cli` module.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(imagestream::cli::main());
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
