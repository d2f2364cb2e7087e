//! `claude-flow store`: the PostgreSQL store's schema, and moving a file
//! store's records into it (CONTRACT section 8).

use clap::{Subcommand, ValueEnum};
use claude_flow_core::state::PostgresStore;
use claude_flow_core::{Config, Error, FileStore, StateStore};

use crate::commands::Failure;
use crate::out::outln;

/// `store` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum StoreCommand {
    /// Create or upgrade the PostgreSQL schema (`store.postgres.url`);
    /// daemons do the same at start.
    Migrate,
    /// Copy the state directory's records into the database, once: refused
    /// when the database already holds records, or while a daemon holds the
    /// state directory.
    Copy {
        /// Where to copy to.
        #[arg(long, value_enum)]
        to: Target,
    },
}

/// A store to copy into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The database `store.postgres.url` names.
    Postgres,
}

/// Runs a `store` subcommand.
pub async fn run(config: &Config, command: StoreCommand) -> Result<(), Failure> {
    let url = config.postgres_url().map_err(Error::from)?;
    match command {
        StoreCommand::Migrate => {
            let migrated = PostgresStore::migrate(&url).await?;
            match migrated.from {
                Some(from) if from == migrated.to => {
                    outln!("the schema is up to date (version {from})")
                }
                Some(from) => outln!("schema upgraded from version {from} to {}", migrated.to),
                None => outln!("schema created (version {})", migrated.to),
            }
        }
        StoreCommand::Copy {
            to: Target::Postgres,
        } => {
            // The lock keeps a daemon from writing while the records are
            // read; a running daemon makes this exit 75.
            let from = FileStore::open(&config.service.state_dir)?;
            let records = from.load().await?;
            let service = from.load_service().await?;
            let settings =
                claude_flow_core::state::PostgresSettings::from_config(&config.store.postgres);
            let into = PostgresStore::connect(&url, settings).await?;
            let copied = into.import(&records, &service).await?;
            into.close().await;
            outln!(
                "copied {copied} issue records from {} into the database; set store.kind to \
                 \"postgres\" to use it",
                config.service.state_dir.display()
            )
        }
    }
}
