//! CPU time of the processes a run involves, read from `/proc` (Linux): where the time of
//! one grab goes, split by process. Used around the race only, so set-up, refusals and the
//! money check are not counted.

use std::time::Duration;

/// The processes to watch, by role. Several processes may share a role (the nodes).
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    processes: Vec<(&'static str, u32)>,
}

/// CPU seconds (user + system) per role, in the order roles were first added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuSample(pub Vec<(&'static str, f64)>);

impl CpuMeter {
    /// Watches this process as `client`.
    pub fn this_process() -> CpuMeter {
        CpuMeter { processes: vec![("client", std::process::id())] }
    }

    pub fn watch(&mut self, role: &'static str, pid: u32) {
        self.processes.push((role, pid));
    }

    /// CPU used so far by each role; a process that cannot be read counts as 0.
    pub fn sample(&self) -> CpuSample {
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for (role, pid) in &self.processes {
            let seconds = process_cpu(*pid).map_or(0.0, |d| d.as_secs_f64());
            match out.iter_mut().find(|(r, _)| r == role) {
                Some((_, total)) => *total += seconds,
                None => out.push((role, seconds)),
            }
        }
        CpuSample(out)
    }
}

impl CpuSample {
    /// What each role used between `before` and this sample.
    pub fn since(&self, before: &CpuSample) -> CpuSample {
        CpuSample(
            self.0
                .iter()
                .map(|(role, s)| (*role, s - before.0.iter().find(|(r, _)| r == role).map_or(0.0, |(_, b)| *b)))
                .collect(),
        )
    }
}

/// utime + stime of a process, fields 14 and 15 of `/proc/PID/stat` (counted after the
/// command name, which is in parentheses and may hold spaces).
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let mut fields = after_name.split(' ').skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_seen_to_use_cpu() {
        let meter = CpuMeter::this_process();
        let before = meter.sample();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(120) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = meter.sample().since(&before);
        assert_eq!(used.0.len(), 1);
        assert!(used.0[0].1 >= 0.05, "{used:?}");
    }
}
