use std::io::Write;
use std::path::Path;

/// Sets up env_logger (level from RUST_LOG, default `info`) so that every line
/// names the device and the socket: `[time LEVEL pvstack-blk /run/x.sock] msg`.
/// Logs go to stderr. Calling it twice keeps the first setup.
pub fn init_logging(device: &str, socket: &Path) {
    let prefix = format!("{device} {}", socket.display());
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "[{} {:5} {}] {}",
                buf.timestamp_millis(),
                record.level(),
                prefix,
                record.args()
            )
        })
        .try_init();
}
