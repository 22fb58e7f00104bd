//! tributary's load tool as a library: the HTTP load driver, the processes
//! it runs (Kafka brokers, replicas, event streams; also used by tributary's fleet
//! tests), the scenarios, the report and its history.

pub mod driver;
pub mod history;
pub mod procs;
pub mod report;
pub mod scenarios;
