//! Every `error-*.yaml` fixture must produce exactly the lines in its `error-*.expected`
//! sibling, and `valid-full.yaml` must load with every value it sets.
//!
//! `SLUICE_BLESS=1 cargo test -p sluice-config --test fixtures` rewrites the `.expected` files
//! from the current output, for review in the diff.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_config::{
    AliasConfig, ApiAuth, AwsConnection, BatchConfig, Config, ConfigErrors, DeadLetterKind,
    DynamoDbStreamsConfig, Effect, HttpSourceConfig, KafkaSecurity, Location, MappingConfig,
    Patterns, RabbitMqConfig, RetryConfig, Runtime, Schedule, SourceKind, SqsConfig,
    StartingPosition, Statement, parse_bytes, parse_str,
};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixed environment, so that `${VAR}` fixtures give the same output everywhere.
fn env(name: &str) -> Option<String> {
    let value = match name {
        "SLUICE_PORT" => "9100",
        "QUALITY" => "",
        "HOOK_TIMEOUT" => "10s",
        "USER_NAME" => "ops",
        "STAGE" => "prod",
        _ => return None,
    };
    Some(value.to_owned())
}

fn load(name: &str) -> Result<Config, ConfigErrors> {
    let path = fixtures_dir().join(name);
    // Bytes, not text: some fixtures are in the wrong encoding on purpose.
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_bytes(&bytes, name, Path::new("/srv/sluice"), &env)
}

#[test]
fn error_fixtures_report_exactly_the_expected_errors() {
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("error-") && name.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 34, "fixtures missing: {names:?}");

    let mut failures = Vec::new();
    for name in &names {
        let expected_path = fixtures_dir().join(name.replace(".yaml", ".expected"));
        let actual = match load(name) {
            Ok(_) => "(loaded without errors)\n".to_owned(),
            Err(errors) => format!("{errors}\n"),
        };
        if bless {
            std::fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        if actual != expected {
            failures.push(format!(
                "{name}\n--- expected\n{expected}--- actual\n{actual}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn full_config_loads_every_value() {
    let config = load("valid-full.yaml").unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(config.origin, "valid-full.yaml");
    assert_eq!(config.base_dir, Path::new("/srv/sluice"));
    assert_eq!(
        config.api.listen,
        "0.0.0.0:9100".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.api.auth, ApiAuth::Sigv4);
    let deployer = &config.api.principals["deployer"];
    assert_eq!(deployer.access_key_id, "AKIASLUICEDEPLOY01");
    assert_eq!(deployer.secret_access_key.expose(), "ops-secret");
    assert_eq!(
        deployer.policy.statements[1],
        Statement {
            sid: None,
            effect: Effect::Deny,
            actions: Patterns::AllBut(vec!["lambda:Get*".into(), "lambda:List*".into()]),
            resources: Patterns::Only(vec![
                "arn:aws:lambda:us-east-1:000000000000:function:resize:*".into()
            ]),
        }
    );
    assert_eq!(deployer.policy.statements[0].sid.as_deref(), Some("all"));
    assert_eq!(
        config.api.principals["reader"].policy.statements[0].resources,
        Patterns::AllBut(vec!["arn:*:secret*".into()])
    );
    assert_eq!(config.state, "postgres://sluice@db/sluice");
    assert_eq!(config.limits.package_zipped, 10_000_000);
    assert_eq!(config.limits.package_unpacked, 1_073_741_824);
    assert_eq!(config.concurrency.limit, 50);
    assert_eq!(config.shutdown_grace, Duration::from_secs(120));
    assert_eq!(
        config.dead_letters.keys().collect::<Vec<_>>(),
        [
            "clicks-dlq",
            "failed-resizes",
            "jobs-dlq",
            "orders-dlq",
            "tasks-dlq"
        ]
    );
    assert_eq!(
        config.dead_letters["failed-resizes"].kind,
        DeadLetterKind::File {
            path: PathBuf::from("/srv/sluice/dead/resize.jsonl")
        }
    );
    assert_eq!(
        config.dead_letters["clicks-dlq"].kind,
        DeadLetterKind::Sqs {
            queue_url: "http://127.0.0.1:5000/123456789012/clicks-dlq".to_owned(),
            aws: AwsConnection {
                endpoint_url: Some("http://127.0.0.1:5000".to_owned()),
                region: Some("us-east-1".to_owned()),
            },
        }
    );
    assert_eq!(
        config.dead_letters["tasks-dlq"].kind,
        DeadLetterKind::RabbitMq {
            uri: "amqps://broker.example.com".to_owned(),
            exchange: "dead".to_owned(),
            routing_key: String::new(),
        }
    );
    assert_eq!(
        config.dead_letters["jobs-dlq"].kind,
        DeadLetterKind::RabbitMq {
            uri: "amqp://127.0.0.1".to_owned(),
            exchange: String::new(),
            routing_key: "jobs.dead".to_owned(),
        }
    );
    assert_eq!(
        config.dead_letters["orders-dlq"].kind,
        DeadLetterKind::Kafka {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            topic: "orders-dlq".to_owned(),
            properties: strings(&[("acks", "all"), ("compression.type", "lz4")]),
        }
    );
    assert_eq!(
        config.functions.keys().collect::<Vec<_>>(),
        ["argv", "embedded", "hook", "resize"]
    );

    let resize = &config.functions["resize"];
    assert_eq!(resize.runtime, Runtime::Process);
    assert_eq!(
        resize.package.as_deref(),
        Some(Path::new("/srv/sluice/functions/resize"))
    );
    assert_eq!(
        resize.command.as_deref(),
        Some(&["python3", "-m", "resize app", "--quality=80"].map(String::from)[..])
    );
    assert_eq!(resize.handler.as_deref(), Some("app.handler"));
    assert_eq!(resize.memory_mb, 256);
    assert_eq!(resize.timeout, Duration::from_secs(90));
    let environment = strings(&[
        ("BUCKET", "thumbs"),
        ("DEBUG", "false"),
        ("EMPTY", ""),
        ("RETRIES", "3"),
        ("TEMPLATE", "${NAME}"),
    ]);
    assert_eq!(resize.environment, environment);
    assert_eq!(resize.reserved_concurrency, Some(10));
    assert_eq!(resize.description.as_deref(), Some("Makes thumbnails"));
    assert_eq!(resize.tags.get("team").map(String::as_str), Some("media"));
    assert_eq!(resize.url, None);
    assert_eq!(resize.max_retry_attempts, 1);
    assert_eq!(resize.max_event_age, Duration::from_secs(3_600));
    assert_eq!(resize.retry_delay, Duration::from_secs(30));
    assert_eq!(resize.on_success.as_deref(), Some("hook"));
    assert_eq!(resize.on_failure.as_deref(), Some("failed-resizes"));
    assert_eq!(resize.aliases.keys().collect::<Vec<_>>(), ["edge", "live"]);
    assert_eq!(
        resize.aliases["live"],
        AliasConfig {
            version: "3".to_owned(),
            additional_version_weights: [("4".to_owned(), 0.1)].into(),
            description: Some("What production calls".to_owned()),
        }
    );
    assert_eq!(
        resize.aliases["edge"],
        AliasConfig {
            version: "$LATEST".to_owned(),
            additional_version_weights: BTreeMap::new(),
            description: None,
        }
    );

    let hook = &config.functions["hook"];
    assert_eq!(hook.runtime, Runtime::Http);
    assert_eq!(
        hook.url.as_deref(),
        Some("https://hooks.example.com/resize")
    );
    assert_eq!(hook.timeout, Duration::from_secs(10));
    assert_eq!((hook.package.as_ref(), hook.command.as_ref()), (None, None));
    assert_eq!(hook.memory_mb, 128);
    assert_eq!(hook.max_retry_attempts, 0);
    assert_eq!(hook.max_event_age, Duration::from_secs(60));
    assert_eq!(hook.retry_delay, Duration::ZERO);
    assert_eq!(
        (hook.on_success.as_deref(), hook.on_failure.as_deref()),
        (None, Some("embedded"))
    );

    let embedded = &config.functions["embedded"];
    assert_eq!(embedded.runtime, Runtime::Native);
    assert_eq!(embedded.handler.as_deref(), Some("embedded"));
    assert_eq!(embedded.timeout, Duration::from_secs(3));
    assert_eq!(embedded.max_retry_attempts, 2);
    assert_eq!(embedded.max_event_age, Duration::from_secs(6 * 3_600));
    assert_eq!(embedded.retry_delay, Duration::from_secs(60));
    assert_eq!((&embedded.on_success, &embedded.on_failure), (&None, &None));
    assert!(embedded.aliases.is_empty());

    let argv = &config.functions["argv"];
    assert_eq!(
        argv.package.as_deref(),
        Some(Path::new("/opt/functions/argv.zip"))
    );
    assert_eq!(
        argv.command.as_deref(),
        Some(&["./run", "--port", "8080"].map(String::from)[..])
    );
    assert_eq!(argv.handler, None);

    let nightly = &config.sources["nightly"];
    assert_eq!(nightly.function, "resize:live");
    assert!(nightly.enabled);
    let SourceKind::Schedule(schedule) = &nightly.kind else {
        panic!("not a schedule: {:?}", nightly.kind)
    };
    assert_eq!(
        schedule.schedule,
        Schedule::Rate(Duration::from_secs(86_400))
    );
    assert_eq!(
        schedule.input,
        Some(serde_json::json!({
            "mode": "full",
            "sizes": [64, 128],
            "ratio": 1.5,
            "quoted": "42",
            "nothing": null,
            "who": "ops",
        }))
    );

    let heartbeat = &config.sources["heartbeat"];
    assert_eq!(heartbeat.function, "hook");
    assert!(!heartbeat.enabled);
    let SourceKind::Schedule(schedule) = &heartbeat.kind else {
        panic!("not a schedule: {:?}", heartbeat.kind)
    };
    assert_eq!(schedule.schedule, Schedule::Rate(Duration::from_secs(30)));
    assert_eq!(schedule.input, None);

    let weekdays = &config.sources["weekdays"];
    let SourceKind::Schedule(schedule) = &weekdays.kind else {
        panic!("not a schedule: {:?}", weekdays.kind)
    };
    assert_eq!(
        schedule.schedule,
        Schedule::Cron {
            expression: "0 9 ? * MON-FRI *".to_owned(),
            cron: "0 0 9 * * MON-FRI *".to_owned(),
        }
    );
    let monthly = &config.sources["monthly"];
    let SourceKind::Schedule(schedule) = &monthly.kind else {
        panic!("not a schedule: {:?}", monthly.kind)
    };
    assert_eq!(
        schedule.schedule,
        Schedule::Cron {
            expression: "30 2 1 JAN,JUL ? *".to_owned(),
            cron: "0 30 2 1 JAN,JUL * *".to_owned(),
        }
    );

    let orders_hook = &config.sources["orders-hook"];
    assert_eq!(orders_hook.function, "resize:live");
    assert!(orders_hook.enabled);
    assert_eq!(
        orders_hook.kind,
        SourceKind::Http(HttpSourceConfig {
            path: "/hooks/orders".to_owned(),
            asynchronous: true,
            methods: vec!["PUT".to_owned(), "POST".to_owned()],
            max_body: sluice_config::defaults::HTTP_MAX_BODY,
            auth: sluice_config::WebhookAuth::None,
        })
    );
    let ping = &config.sources["ping"];
    assert!(!ping.enabled);
    assert_eq!(
        ping.kind,
        SourceKind::Http(HttpSourceConfig {
            path: "/metrics-in/ping".to_owned(),
            asynchronous: false,
            methods: vec!["POST".to_owned()],
            max_body: sluice_config::defaults::HTTP_MAX_BODY,
            auth: sluice_config::WebhookAuth::None,
        })
    );

    assert_poll_sources(&config);
}

fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn assert_poll_sources(config: &Config) {
    let clicks = &config.sources["clicks"];
    assert_eq!(clicks.function, "resize");
    let SourceKind::Kinesis(kinesis) = &clicks.kind else {
        panic!("not kinesis: {:?}", clicks.kind)
    };
    assert_eq!(
        kinesis.stream,
        "arn:aws:kinesis:eu-west-1:123456789012:stream/clicks"
    );
    assert_eq!(
        kinesis.aws,
        AwsConnection {
            endpoint_url: Some("http://127.0.0.1:4566".to_owned()),
            region: Some("eu-west-1".to_owned()),
        }
    );
    assert_eq!(
        kinesis.mapping,
        MappingConfig {
            // 2024-05-01T12:00:00+02:00
            starting_position: StartingPosition::AtTimestamp(1_714_557_600_000),
            batch: BatchConfig {
                size: 500,
                window: Duration::from_secs(2),
                max_bytes: 1_000_000,
            },
            filters: vec![
                serde_json::json!({ "data": { "kind": ["click"] } }),
                serde_json::json!({
                    "data": { "kind": [{ "prefix": "view-" }], "weight": [{ "numeric": [">", 2] }] }
                }),
            ],
            parallelization: 4,
            retry: RetryConfig {
                max_attempts: Some(3),
                max_record_age: Some(Duration::from_secs(3_600)),
            },
            bisect_on_error: true,
            report_batch_item_failures: true,
            on_failure: Some("clicks-dlq".to_owned()),
            enabled: true,
        }
    );

    // Everything left out takes its default; `-1` means no limit.
    let table_changes = &config.sources["table-changes"];
    assert!(!table_changes.enabled);
    assert_eq!(
        table_changes.kind,
        SourceKind::DynamoDbStreams(DynamoDbStreamsConfig {
            stream_arn: None,
            table: Some("Orders".to_owned()),
            aws: AwsConnection::default(),
            mapping: MappingConfig {
                starting_position: StartingPosition::Latest,
                batch: BatchConfig {
                    size: 100,
                    window: Duration::ZERO,
                    max_bytes: 6 * 1024 * 1024,
                },
                filters: Vec::new(),
                parallelization: 1,
                retry: RetryConfig {
                    max_attempts: None,
                    max_record_age: None,
                },
                bisect_on_error: false,
                report_batch_item_failures: false,
                on_failure: None,
                enabled: false,
            },
        })
    );
    let SourceKind::DynamoDbStreams(stream_changes) = &config.sources["stream-changes"].kind else {
        panic!("not dynamodb_streams")
    };
    assert_eq!(
        stream_changes.stream_arn.as_deref(),
        Some("arn:aws:dynamodb:us-east-1:123456789012:table/Orders/stream/2024-05-01T00:00:00.000")
    );
    assert_eq!(stream_changes.table, None);
    assert_eq!(
        stream_changes.mapping.starting_position,
        StartingPosition::TrimHorizon
    );
    assert_eq!(stream_changes.mapping.retry, RetryConfig::default());

    assert_eq!(
        config.sources["jobs"].kind,
        SourceKind::Sqs(SqsConfig {
            queue_url: "http://127.0.0.1:5000/123456789012/jobs".to_owned(),
            aws: AwsConnection {
                endpoint_url: None,
                region: Some("us-east-1".to_owned()),
            },
            maximum_concurrency: Some(5),
            mapping: MappingConfig {
                batch: BatchConfig {
                    size: 100,
                    window: Duration::from_millis(500),
                    max_bytes: 6 * 1024 * 1024,
                },
                report_batch_item_failures: true,
                on_failure: Some("failed-resizes".to_owned()),
                ..MappingConfig::default()
            },
        })
    );

    assert_eq!(
        config.sources["tasks"].kind,
        SourceKind::RabbitMq(RabbitMqConfig {
            uri: "amqp://ops:secret@127.0.0.1:5672/%2f".to_owned(),
            queue: "tasks".to_owned(),
            prefetch: 250,
            mapping: MappingConfig {
                on_failure: Some("tasks-dlq".to_owned()),
                // A requeueing queue bounds its retries by default.
                retry: RetryConfig {
                    max_attempts: Some(sluice_config::defaults::QUEUE_MAX_ATTEMPTS),
                    max_record_age: None,
                },
                ..MappingConfig::default()
            },
        })
    );

    let SourceKind::Kafka(orders) = &config.sources["orders"].kind else {
        panic!("not kafka")
    };
    assert_eq!(orders.brokers, ["127.0.0.1:9092", "[::1]:9093"]);
    assert_eq!(orders.topics, ["orders", "2024"]);
    assert_eq!(orders.topic_pattern, None);
    assert_eq!(orders.group_id, "sluice-orders");
    // Protocol and mechanism in librdkafka's spelling whatever the case given; credentials as
    // text whatever they look like.
    assert_eq!(
        orders.security,
        KafkaSecurity {
            protocol: Some("sasl_ssl".to_owned()),
            sasl_mechanism: Some("SCRAM-SHA-512".to_owned()),
            username: Some("ops".to_owned()),
            password: Some("12345".to_owned()),
            ca_location: Some(PathBuf::from("/srv/sluice/certs/ca.pem")),
        }
    );
    assert_eq!(
        orders.properties,
        strings(&[
            ("check.crcs", "true"),
            ("client.id", "sluice"),
            ("fetch.min.bytes", "1024"),
        ])
    );
    assert_eq!(
        orders.mapping,
        MappingConfig {
            starting_position: StartingPosition::Latest,
            batch: BatchConfig {
                size: 100,
                window: Duration::from_millis(500),
                max_bytes: 6 * 1024 * 1024,
            },
            retry: RetryConfig {
                max_attempts: Some(5),
                max_record_age: Some(Duration::from_secs(3_600)),
            },
            bisect_on_error: true,
            report_batch_item_failures: true,
            on_failure: Some("orders-dlq".to_owned()),
            ..MappingConfig::default()
        }
    );

    let SourceKind::Kafka(audit) = &config.sources["audit"].kind else {
        panic!("not kafka")
    };
    assert_eq!(audit.brokers, ["127.0.0.1:9092", "127.0.0.1:9093"]);
    assert!(audit.topics.is_empty());
    assert_eq!(audit.topic_pattern.as_deref(), Some("audit-.*"));
    assert_eq!(audit.security, KafkaSecurity::default());
    assert!(audit.properties.is_empty());
    assert_eq!(audit.mapping, MappingConfig::default());
    assert_eq!(
        config.sources["audit"].kind.mapping(),
        Some(&MappingConfig::default())
    );
    assert_eq!(config.sources["ping"].kind.mapping(), None);
}

#[test]
fn locations_name_every_node_by_path() {
    let config = load("valid-full.yaml").unwrap();
    let at = |line, column| Some(Location { line, column });
    assert_eq!(config.location("functions.resize"), at(27, 3));
    assert_eq!(config.location("functions.resize.package"), at(29, 14));
    assert_eq!(
        config.location("functions.resize.environment.EMPTY"),
        at(38, 7)
    );
    assert_eq!(config.location("functions.argv.command[2]"), at(68, 30));
    assert_eq!(
        config.location("sources.nightly.input.sizes[1]"),
        at(76, 19)
    );
    assert_eq!(
        config.location("functions.resize.aliases.live.additional_version_weights.4"),
        at(52, 44)
    );
    assert_eq!(config.location("functions.nope"), None);

    let error = config.error_at("functions.resize.package", "no such directory");
    assert_eq!(
        error.to_string(),
        "valid-full.yaml:29:14: functions.resize.package: no such directory"
    );
}

#[test]
fn empty_file_gives_the_defaults() {
    for text in ["", "# only a comment\n", "---\n", "~\n"] {
        let config = parse_str(text, "empty.yaml", Path::new("/etc/sluice"), &env).unwrap();
        assert_eq!(
            config,
            Config {
                origin: "empty.yaml".to_owned(),
                base_dir: PathBuf::from("/etc/sluice"),
                locations: config.locations.clone(),
                ..Config::default()
            },
            "for {text:?}"
        );
        assert!(config.functions.is_empty() && config.sources.is_empty());
        assert_eq!(
            config.api.listen,
            "127.0.0.1:9000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.state, "sqlite://./data/sluice.db");
        assert_eq!(config.limits.package_zipped, 50_000_000);
        assert_eq!(config.limits.package_unpacked, 250_000_000);
        assert_eq!(config.concurrency.limit, 1000);
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
        assert!(config.dead_letters.is_empty());
    }
}

#[test]
fn load_file_resolves_packages_against_the_file_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, "functions:\n  f:\n    package: ./pkg\n").unwrap();
    let config = sluice_config::load_file(&path).unwrap();
    assert_eq!(config.origin, path.display().to_string());
    assert_eq!(
        config.functions["f"].package.as_deref(),
        Some(dir.path().join("pkg").as_path())
    );
}

#[test]
fn load_file_reports_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.yaml");
    let errors = sluice_config::load_file(&path).unwrap_err();
    assert_eq!(errors.errors.len(), 1);
    assert!(
        errors
            .to_string()
            .starts_with(&format!("{}: cannot read the file: ", path.display())),
        "{errors}"
    );
}
