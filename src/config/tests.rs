use super::*;

#[test]
fn embedded_serve_runs_workers_by_default_redis_serve_does_not() {
    let mut config = Config::default();
    assert_eq!(config.effective_serve_workers(), 2);
    config.redis_url = Some("redis://127.0.0.1".into());
    assert_eq!(config.effective_serve_workers(), 0);
    config.serve_workers = Some(3);
    assert_eq!(config.effective_serve_workers(), 3);
}

#[test]
fn flags_override_defaults_and_bad_rates_are_refused() {
    let args = ConfigArgs {
        allowed_schemes: Some("https, FILE".into()),
        sync_rate: Some("5/s".into()),
        ..Default::default()
    };
    let config = args.into_config().expect("valid");
    assert_eq!(config.allowed_schemes, vec!["https", "file"]);
    assert_eq!(config.sync_rate, (5, Duration::from_secs(1)));
    let drain = ConfigArgs {
        drain_timeout_s: Some(5),
        ..Default::default()
    };
    assert_eq!(
        drain.into_config().expect("valid").drain_timeout,
        Duration::from_secs(5)
    );
    let bad = ConfigArgs {
        sync_rate: Some("lots".into()),
        ..Default::default()
    };
    assert!(bad.into_config().is_err());
}
