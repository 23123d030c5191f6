//! The MariaDB/MySQL provider as a plugin binary: the whole of it is the kit.

fn main() -> std::process::ExitCode {
    leasehold_plugin::kit::main(
        leasehold_plugin::kit::Plugin::<leasehold_provider_mysql::MysqlConfig>::new(
            "leasehold-plugin-mysql",
            env!("CARGO_PKG_VERSION"),
        )
        .scopes(|cfg, role| {
            cfg.roles
                .get(role)
                .map(|r| r.scopes.clone())
                .unwrap_or_default()
        }),
    )
}
