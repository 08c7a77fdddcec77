//! How long each phase of a capture or restore took, printed to stderr when TELEFORK_DEBUG
//! is set (finding where the time goes). Owns no process state.

/// Phase times, printed to stderr when TELEFORK_DEBUG is set (for finding where time goes).
pub struct Timeline {
    start: std::time::Instant,
    last: std::time::Instant,
    /// Name, milliseconds, ptrace round trips.
    phases: Vec<(&'static str, f64, u64)>,
    notes: Vec<String>,
    /// `inject::INJECTED` and `inject::ROUND_TRIPS` when the timeline began.
    injected_at_start: (u64, u64),
    trips_at_last: u64,
}

fn injected_so_far() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (crate::inject::INJECTED.load(Relaxed), crate::inject::ROUND_TRIPS.load(Relaxed))
}

impl Timeline {
    pub fn new() -> Self {
        let now = std::time::Instant::now();
        let injected = injected_so_far();
        Timeline {
            start: now,
            last: now,
            phases: Vec::new(),
            notes: Vec::new(),
            injected_at_start: injected,
            trips_at_last: injected.1,
        }
    }

    pub fn mark(&mut self, phase: &'static str) {
        stamp(phase);
        let now = std::time::Instant::now();
        let trips = injected_so_far().1;
        self.phases.push((
            phase,
            (now - self.last).as_secs_f64() * 1e3,
            trips - self.trips_at_last,
        ));
        self.last = now;
        self.trips_at_last = trips;
    }

    /// Something worth printing with the times (how a phase did its work).
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    pub fn report(&self, what: &str) {
        if debugging() {
            // (phase milliseconds, then its ptrace round trips after a slash)
            let parts: Vec<String> =
                self.phases.iter().map(|(p, ms, trips)| format!("{p} {ms:.2}/{trips}")).collect();
            let (calls, trips) = injected_so_far();
            eprintln!(
                "telefork: {what} {:.2} ms: {} ({} calls injected in {} round trips)",
                (self.last - self.start).as_secs_f64() * 1e3,
                parts.join(", "),
                calls - self.injected_at_start.0,
                trips - self.injected_at_start.1
            );
            for n in &self.notes {
                eprintln!("telefork: {what}: {n}");
            }
        }
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether TELEFORK_DEBUG is set (read once per process).
fn debugging() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TELEFORK_DEBUG").is_some())
}

/// With TELEFORK_DEBUG, prints `XT <µs of CLOCK_MONOTONIC> <pid> <what>` to stderr: a step
/// on the clock all processes of a machine share (outside time namespaces, which the
/// testbed does not use), so that the stamps of the program, its daemon's session and the
/// destination's (testbed nodes share the machine) merge into one timeline of a telefork
/// (`scripts/timeline.py`).
pub fn stamp(what: &str) {
    if debugging() {
        let us = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|ts| ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        eprintln!("XT {us} {} {what}", std::process::id());
    }
}
