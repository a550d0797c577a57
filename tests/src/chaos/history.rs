//! The history of a chaos run: every operation's start and end time, arguments and
//! outcome, and every fault the nemesis injected, in the order they completed. Written as
//! JSON lines, so a failed run can be read, filtered and replayed by eye.

use std::sync::Arc;
use std::sync::Mutex;

use serde::Deserialize;
use serde::Serialize;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Create { request_id: String, sender: String, total: u64, shares: u32, equal: bool, group: bool },
    Grab { packet_id: String, user: String },
    Open { packet_id: String, user: String },
    GrabOpen { packet_id: String, user: String },
    Read { packet_id: String },
    Nemesis { fault: String, target: String },
}

impl Op {
    pub fn packet_id(&self) -> Option<&str> {
        match self {
            Op::Grab { packet_id, .. } | Op::Open { packet_id, .. } | Op::GrabOpen { packet_id, .. } | Op::Read { packet_id } => {
                Some(packet_id)
            }
            _ => None,
        }
    }

    pub fn user(&self) -> Option<&str> {
        match self {
            Op::Grab { user, .. } | Op::Open { user, .. } | Op::GrabOpen { user, .. } => Some(user),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Created { packet_id: String },
    Grabbed { share_index: u32 },
    Opened { share_index: u32, amount: u64 },
    Read { grabbed: u32, opened: u32 },
    Done,
    /// Definitely did not happen (a refusal: sold out, not a recipient...).
    Fail { reason: String },
    /// May or may not have happened (the client gave up: timeouts, no leader).
    Unknown { message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub process: String,
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(flatten)]
    pub op: Op,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Shared recorder of a run's events.
#[derive(Clone)]
pub struct History {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Default for History {
    fn default() -> Self {
        History { start: Instant::now(), events: Arc::default() }
    }
}

impl History {
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn record(&self, process: &str, start_ms: u64, op: Op, outcome: Outcome) {
        let event = Event { process: process.to_string(), start_ms, end_ms: self.now_ms(), op, outcome };
        self.events.lock().expect("history lock").push(event);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("history lock").clone()
    }

    /// Writes the history as JSON lines.
    pub fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let mut out = String::new();
        for e in self.events() {
            out.push_str(&serde_json::to_string(&e)?);
            out.push('\n');
        }
        std::fs::write(path, out)?;
        Ok(())
    }
}
