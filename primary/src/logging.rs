//! A small stderr logger: `TIME qpnet[PID] ROLE LEVEL: message`. The level
//! comes from `QPNET_LOG` (error, warn, info, debug, trace; default info).

use std::io::Write;

struct StderrLogger {
    role: String,
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let line = format!(
            "{h:02}:{m:02}:{s:02}.{:03} qpnet[{}] {} {}: {}\n",
            now.subsec_millis(),
            std::process::id(),
            self.role,
            r.level().as_str().to_lowercase(),
            r.args()
        );
        // One write per line so lines of concurrent processes do not mix.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Install the logger for a process playing `role` ("primary", "worker 2").
pub fn init(role: &str) {
    let level = std::env::var("QPNET_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger = StderrLogger {
        role: role.to_string(),
        level,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
