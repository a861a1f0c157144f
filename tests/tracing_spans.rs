//! The handlers' `tracing` spans. In a binary of their own, one test at a time: tracing caches
//! whether a callsite is enabled for all threads, so tests without a subscriber running beside
//! these (as in the other suites) can leave a span disabled for them.

mod support;

use channel_dispatcher::{Context, Dispatcher, Router};
use support::{within, Echo, Logs};

static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn handled_requests_get_a_tracing_span_with_method_and_id() {
    let _alone = ALONE.lock().await;
    let (logs, _guard) = Logs::capture("debug");

    let (a, b) = channel_dispatcher::Channel::pair();
    let _server = Dispatcher::builder()
        .handler(Router::new().request(|_cx: Context, Echo(s)| async move {
            tracing::info!("handling");
            // Polled again after a wake: still in its span.
            tokio::task::yield_now().await;
            tracing::info!("resumed");
            Ok(s)
        }))
        .spawn(b);
    let client = Dispatcher::builder().spawn(a);
    within(client.request(Echo("traced".into()))).await.unwrap();
    let output = logs.text();
    for event in ["handling", "resumed"] {
        assert!(
            output
                .lines()
                .any(|line| line.contains("handle{method=echo id=1}: ") && line.contains(event)),
            "{event}: {output}"
        );
    }
}

#[tokio::test]
async fn a_cancelled_handler_is_dropped_in_its_span() {
    struct LogsWhenDropped;
    impl Drop for LogsWhenDropped {
        fn drop(&mut self) {
            tracing::info!("handler dropped");
        }
    }
    let _alone = ALONE.lock().await;
    let (logs, _guard) = Logs::capture("debug");
    let (a, b) = channel_dispatcher::Channel::pair();
    let _server = Dispatcher::builder()
        .handler(Router::new().request(|_cx: Context, Echo(s)| async move {
            let _held = LogsWhenDropped;
            std::future::pending::<()>().await;
            Ok(s)
        }))
        .spawn(b);
    let client = Dispatcher::builder().spawn(a);
    // The caller gives up; its cancel makes the server drop the waiting handler.
    let call = client
        .request(Echo("cancelled".into()))
        .timeout(std::time::Duration::from_millis(50));
    assert!(within(call).await.is_err());
    within(async {
        while !logs.text().contains("handler dropped") {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let output = logs.text();
    assert!(
        output
            .lines()
            .any(|line| line.contains("handle{method=echo id=1}: ")
                && line.contains("handler dropped")),
        "{output}"
    );
}
