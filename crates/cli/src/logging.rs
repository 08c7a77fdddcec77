//! Where the binary's events go: a `tracing` subscriber on stderr, its filter from
//! `TELEFORK_LOG` (EnvFilter syntax, e.g. `debug` or `telefork_node=debug,info`); without it,
//! `TELEFORK_DEBUG=1` means `debug`, else `info` for the daemon and `warn` for the commands.
//! The daemon's lines keep their form, `[seconds since the epoch] telefork-daemon[PID]: …`
//! (the PID is the session's in a session process), the level named unless it is INFO.
//! A command's own report and its final "error: …" line are plain stderr, not events.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable holding the filter.
pub const LOG_ENV: &str = "TELEFORK_LOG";

/// Installs the subscriber: the daemon's (`daemon`) or a command's.
pub fn init(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = match std::env::var(LOG_ENV) {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("telefork: {LOG_ENV}={spec:?} is not a filter ({e}); logging at {default}");
            EnvFilter::new(default)
        }),
        Err(_) if std::env::var_os("TELEFORK_DEBUG").is_some() => EnvFilter::new("debug"),
        Err(_) => EnvFilter::new(default),
    };
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // (Best effort: a subscriber already set, by a test say, stays.)
    let _ = if daemon {
        fmt.event_format(DaemonLine).try_init()
    } else {
        fmt.with_target(false).without_time().try_init()
    };
}

/// The daemon's line: `[1796686634.026] telefork-daemon[8546]: message`.
struct DaemonLine;

impl<S, N> FormatEvent<S, N> for DaemonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        // (The PID asked each time: sessions are forked from the daemon.)
        write!(w, "[{now:.3}] telefork-daemon[{}]: ", std::process::id())?;
        let level = *event.metadata().level();
        if level != Level::INFO {
            write!(w, "{level}: ")?;
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}
