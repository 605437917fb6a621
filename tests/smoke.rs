mod common;

#[tokio::test]
async fn harness_starts_redis_and_server() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(
        common::test_config(&redis.url()),
        tollgate::ledger::Clock::Redis,
    )
    .await;
    let mut admin = server.admin().await;
    let out = admin
        .grant(tollgate::api::pb::GrantRequest {
            account_id: "a1".into(),
            amount: 10,
            idempotency_key: "g1".into(),
            ..Default::default()
        })
        .await
        .expect("grant")
        .into_inner();
    assert_eq!(out.available, 10);
    server.stop().await;
}
