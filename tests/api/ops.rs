//! What the orchestrator and operators see: health, reflection, start-up
//! validation and migrations.

use std::time::Duration;

use idemd::config::{DatabaseConfig, DatabaseUrl};
use idemd::pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::*;

async fn liveness_and_readiness_are_serving(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut health = app.health();
    for service in ["", pb::SERVICE_NAME, pb::ADMIN_SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

async fn reflection_lists_the_services_v1_and_v1alpha(backend: Backend) {
    let app = spawn_app(backend).await;
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(app.channel());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream =
            client.server_reflection_info(tokio_stream::once(request)).await.expect("reflection v1").into_inner();
        let response = stream.message().await.expect("message").expect("a response");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected {response:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&pb::SERVICE_NAME.to_string()), "{names:?}");
        assert!(names.contains(&pb::ADMIN_SERVICE_NAME.to_string()), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(app.channel());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(pb::SERVICE_NAME.into())),
        };
        let mut stream =
            client.server_reflection_info(tokio_stream::once(request)).await.expect("reflection v1alpha").into_inner();
        let response = stream.message().await.expect("message").expect("a response");
        assert!(
            matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
            "{response:?}"
        );
    }
}

async fn migrate_is_idempotent(backend: Backend) {
    let app = spawn_app(backend).await;
    let database = DatabaseConfig {
        database_url: idemd::config::DatabaseUrl::new(app.database_url.clone()),
        db_max_connections: 2,
        store_timeout: Duration::from_secs(5),
        group_commit_max_batch: 1,
        group_commit_window: Duration::ZERO,
        group_commit_in_flight: 1,
        db_pooler: idemd::config::DbPooler::None,
        direct_database_url: None,
    };
    idemd::server::migrate(&database).await.expect("migrations already applied: no-op");
    app.acquire(begin_req("still-works")).await;
}

crate::both_stores!(
    liveness_and_readiness_are_serving,
    reflection_lists_the_services_v1_and_v1alpha,
    migrate_is_idempotent,
);

#[tokio::test]
async fn invalid_settings_stop_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(&format!("sqlite://{}", dir.path().join("x.db").display()));
    config.default_lease_ttl = Duration::from_secs(7200);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let listeners = idemd::server::Listeners { grpc, metrics: None, health: None };
    let error = idemd::server::run(config, listeners, std::future::pending())
        .await
        .expect_err("a lease default over 1 h is refused");
    assert!(error.to_string().contains("--default-lease-ttl"), "{error}");
}

/// Behind a transaction pooler, migrations need Postgres itself: without a
/// direct URL, start-up says how to proceed instead of migrating through it.
#[tokio::test]
async fn a_transaction_pooler_without_a_direct_url_refuses_to_migrate() {
    let database_url = fresh_postgres_database(&admin_url()).await;
    let mut config = test_config(&pooled_url(&database_url));
    config.database.db_pooler = idemd::config::DbPooler::Transaction;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let listeners = idemd::server::Listeners { grpc, metrics: None, health: None };
    let run = idemd::server::run(config, listeners, std::future::pending());
    let error = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("start-up gives up at once")
        .expect_err("no migrations through the pooler");
    assert!(format!("{error:#}").contains("--direct-database-url"), "{error:#}");
}

/// With `--direct-database-url`, migrations and LISTEN go to Postgres
/// itself and every call through the pooler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooler_with_a_direct_url_migrates_and_serves() {
    let database_url = fresh_postgres_database(&admin_url()).await;
    let mut config = test_config(&pooled_url(&database_url));
    config.database.db_pooler = idemd::config::DbPooler::Transaction;
    config.database.direct_database_url = Some(DatabaseUrl::new(database_url.clone()));
    let app = spawn_on(config).await;
    let lease = app.acquire(begin_req("k")).await;
    app.complete("k", &lease.lease_token, b"through the pooler").await.expect("complete");
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!(record.response, b"through the pooler");
}

#[test]
fn pooler_settings_that_cannot_work_are_refused() {
    let mut config = test_config("sqlite://x.db");
    config.database.db_pooler = idemd::config::DbPooler::Transaction;
    let error = config.validate().expect_err("no pooler in front of SQLite").to_string();
    assert!(error.contains("--db-pooler"), "{error}");
    let mut config = test_config("postgres://db/idemd");
    config.database.direct_database_url = Some(DatabaseUrl::new("sqlite://x.db"));
    let error = config.validate().expect_err("the direct URL is Postgres").to_string();
    assert!(error.contains("--direct-database-url"), "{error}");
}

#[tokio::test]
async fn stop_exits_cleanly() {
    let app = spawn_app(Backend::Sqlite).await;
    app.acquire(begin_req("k")).await;
    app.stop().await.expect("clean stop");
}
