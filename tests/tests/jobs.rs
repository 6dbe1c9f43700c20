//! Looking jobs up: every state a job can be in, from the operator's API
//! and the CLI.

use std::time::Duration;

use demi_e2e::grpc::{self, admin_pb as pb};
use demi_e2e::{Conductor, ok};

fn state(s: pb::job_state::State) -> i32 {
    s as i32
}

fn job(kind: &str, payload: &[u8]) -> pb::SubmitRequest {
    pb::SubmitRequest {
        plugin: "worker".into(),
        kind: kind.into(),
        payload: payload.to_vec(),
        ..Default::default()
    }
}

#[test]
fn get_job_and_wait_job_tell_every_state_of_a_job() {
    use pb::job_state::State as S;
    // One job at a time, "hang" never answers: the first hang is in
    // flight and the next waits in the queue.
    let conductor = Conductor::builder()
        .conductor("[conductor.jobs]\nkeep_answers = \"3s\"\n")
        .start(
            "[plugins.worker]\ncommand = \"{echo}\"\nargs = [\"--hang-kind\", \"hang\"]\n\
             shutdown_grace = \"1s\"\n[plugins.worker.dispatch]\nmax_in_flight = 1\n\
             max_attempts = 1\nattempt_timeout = \"60s\"\n\
             [plugins.broken]\ncommand = \"{echo}\"\nargs = [\"--fail-permanent\", \"1.0\"]\n\
             shutdown_grace = \"1s\"\n",
        );
    conductor.wait_serving(0, "worker", 0);
    conductor.wait_serving(0, "broken", 0);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let get = |id: &str| pb::GetJobRequest { job_id: id.into() };

        let answered = api
            .submit(job("echo", b"\xffbinary"))
            .await
            .unwrap()
            .into_inner();
        let waited = api
            .wait_job(pb::WaitJobRequest {
                job_id: answered.job_id.clone(),
                timeout: Some(grpc::ProstDuration {
                    seconds: 20,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(waited.state, state(S::Completed), "{waited:?}");
        assert_eq!(waited.answer, b"\xffbinary");
        assert_eq!((waited.plugin.as_str(), waited.attempts), ("worker", 1));
        assert!(waited.finished_at.is_some());

        let hung = api
            .submit(job("hang", b""))
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let queued = api
            .submit(job("hang", b""))
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let mut seen = None;
        for _ in 0..100 {
            let s = api.get_job(get(&hung)).await.unwrap().into_inner();
            if s.state == state(S::InFlight) {
                seen = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let in_flight = seen.expect("the first hang never went in flight");
        assert_eq!(in_flight.attempts, 1);
        let q = api.get_job(get(&queued)).await.unwrap().into_inner();
        assert_eq!(q.state, state(S::Queued), "{q:?}");
        // A wait that ends before the job does answers the state as it is.
        let still = api
            .wait_job(pb::WaitJobRequest {
                job_id: queued.clone(),
                timeout: Some(grpc::ProstDuration {
                    seconds: 0,
                    nanos: 300_000_000,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(still.state, state(S::Queued));

        // Ids begin with their acceptance time: one from now that was
        // never handed out is unknown, as is anything else.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        for never in [format!("{now_ms:012x}{:020x}", 7), "no-such-job".into()] {
            let unknown = api.get_job(get(&never)).await.unwrap().into_inner();
            assert_eq!(unknown.state, state(S::Unknown), "{never}");
        }
        let empty = api.get_job(get("")).await.unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);

        // The answer is kept for keep_answers, then the job reads expired.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let gone = api
            .get_job(get(&answered.job_id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(gone.state, state(S::Expired), "{gone:?}");
        assert!(gone.answer.is_empty());
    });

    // A job that fails for good reads dead-lettered, with its error; the
    // command line submits binary payloads and shows both.
    let id = ok(conductor.cli(&["submit", "broken", "--payload-base64", "/wA="]));
    let shown = ok(conductor.cli(&["job", id.trim(), "--wait", "--json"]));
    let value: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(value["state"], "dead_lettered", "{shown}");
    assert_eq!(value["plugin"], "broken");
    let error = value["errors"][0].as_str().unwrap_or_default();
    assert!(error.contains("injected permanent failure"), "{shown}");
    let letter = ok(conductor.cli(&["dlq", "show", id.trim()]));
    assert!(letter.contains("payload  base64:/wA="), "{letter}");
}
