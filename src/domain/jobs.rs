//! The revocation jobs running in the background: their tasks and their
//! stop signal (a job's progress is in the store, so a stopped job resumes
//! at the next start). The jobs themselves are `incident`'s.

/// The background tasks of running jobs, and their stop signal.
#[derive(Debug)]
pub struct JobRunner {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Jobs running here now (a job runs at most once per node).
    running: std::sync::Mutex<std::collections::BTreeSet<u128>>,
}

impl Default for JobRunner {
    fn default() -> Self {
        Self {
            stop: tokio::sync::watch::channel(false).0,
            tasks: std::sync::Mutex::default(),
            running: std::sync::Mutex::default(),
        }
    }
}

impl JobRunner {
    /// Stop every job at its next step and wait for them: a job's progress
    /// is in the store, so the next start resumes it.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
    }

    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Take a job to run here; false if it already runs here.
    pub(crate) fn claim(&self, id: u128) -> bool {
        self.running.lock().is_ok_and(|mut r| r.insert(id))
    }

    pub(crate) fn release(&self, id: u128) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(&id);
        }
    }

    pub(crate) fn track(&self, h: tokio::task::JoinHandle<()>) {
        if let Ok(mut t) = self.tasks.lock() {
            t.retain(|h| !h.is_finished());
            t.push(h);
        }
    }
}
