//! How long each phase of a capture or restore took, printed to stderr when TELEFORK_DEBUG
//! is set (finding where the time goes). Owns no process state.

/// Phase times, printed to stderr when TELEFORK_DEBUG is set (for finding where time goes).
pub struct Timeline {
    start: std::time::Instant,
    last: std::time::Instant,
    phases: Vec<(&'static str, f64)>,
    notes: Vec<String>,
}

impl Timeline {
    pub fn new() -> Self {
        let now = std::time::Instant::now();
        Timeline { start: now, last: now, phases: Vec::new(), notes: Vec::new() }
    }

    pub fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.phases.push((phase, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }

    /// Something worth printing with the times (how a phase did its work).
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    pub fn report(&self, what: &str) {
        if std::env::var_os("TELEFORK_DEBUG").is_some() {
            let parts: Vec<String> = self.phases.iter().map(|(p, ms)| format!("{p} {ms:.2}")).collect();
            eprintln!("telefork: {what} {:.2} ms: {}", (self.last - self.start).as_secs_f64() * 1e3, parts.join(", "));
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
