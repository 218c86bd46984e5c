//! Integration tests: the real server on port 0 with a fresh database, against local
//! endpoints and callback receivers. One binary, so the build links once.

mod callbacks;
mod cli;
mod client;
mod crash;
mod dashboard;
mod dynamo;
mod helpers;
mod lifecycle;
mod moto;
mod observe;
mod security;
mod submit;
mod tasks;
