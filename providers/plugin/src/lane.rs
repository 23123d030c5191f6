//! The thread that makes `Validate` calls for the synchronous
//! `Provider::validate`: its own current-thread runtime and connection, so
//! it works from any runtime (or none), bounded by the plugin's timeout.
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::wire;

type Reply = Result<wire::ValidateResponse, String>;

struct Job {
    socket: PathBuf,
    generation: u64,
    req: wire::ValidateRequest,
    timeout: Duration,
    reply: mpsc::SyncSender<Reply>,
}

#[derive(Debug)]
pub(crate) struct Lane {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Lane {
    pub(crate) fn new() -> Result<Self, String> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("the plugin validation thread: {e}"))?;
        std::thread::Builder::new()
            .name("plugin-validate".into())
            .spawn(move || {
                let mut client = None;
                // ends when the provider (the only sender) is dropped
                while let Ok(job) = rx.recv() {
                    let answer = rt.block_on(async {
                        tokio::time::timeout(job.timeout, run(&mut client, &job))
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("no answer within {}s", job.timeout.as_secs()))
                            })
                    });
                    if answer.is_err() {
                        client = None;
                    }
                    let _ = job.reply.send(answer);
                }
            })
            .map_err(|e| format!("the plugin validation thread: {e}"))?;
        Ok(Self { jobs })
    }

    pub(crate) fn validate(
        &self,
        socket: &Path,
        generation: u64,
        req: wire::ValidateRequest,
        timeout: Duration,
    ) -> Reply {
        let (reply, answer) = mpsc::sync_channel(1);
        self.jobs
            .send(Job {
                socket: socket.to_owned(),
                generation,
                req,
                timeout,
                reply,
            })
            .map_err(|_| "the validation thread stopped".to_owned())?;
        answer
            .recv_timeout(timeout + Duration::from_secs(1))
            .map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
    }
}

async fn run(
    client: &mut Option<(
        u64,
        crate::wire::provider_client::ProviderClient<tonic::transport::Channel>,
    )>,
    job: &Job,
) -> Reply {
    if client.as_ref().is_none_or(|(g, _)| *g != job.generation) {
        *client = Some((job.generation, crate::process::connect(&job.socket).await?));
    }
    let Some((_, c)) = client.as_mut() else {
        return Err("not connected".into());
    };
    c.validate(job.req.clone())
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| crate::process::status_text(&s))
}
