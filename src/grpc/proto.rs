//! Generated code of `proto/qnode/v1/inference.proto` (package `qnode.v1`) and its descriptor set,
//! which server reflection serves so `grpcurl` needs no `.proto`.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("qnode.v1");

/// `grpc.health.v1` (proto/grpc/health/v1/health.proto): the standard health service with its
/// `List` method.
pub mod health {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("grpc.health.v1");
}

/// Encoded `FileDescriptorSet` of `qnode.v1` and `grpc.health.v1`, written by build.rs.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qnode_v1_descriptor");
