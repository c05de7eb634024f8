// Package grpctest starts real gRPC servers over an in-memory connection for
// tests, with the same interceptor chain the services use.
package grpctest

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
)

// Start builds a server with grpcserver.New(opts), lets register add the
// services, serves it over bufconn and returns a client connection to it.
// Everything is stopped by t.Cleanup.
func Start(t testing.TB, opts grpcserver.Options, register func(*grpc.Server)) *grpc.ClientConn {
	t.Helper()
	srv, err := grpcserver.New(opts)
	if err != nil {
		t.Fatalf("grpcserver.New: %v", err)
	}
	register(srv.Server)
	srv.Ready()
	lis := bufconn.Listen(1 << 20)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()

	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() {
		_ = conn.Close()
		srv.Stop()
		if err := <-served; err != nil && err != grpc.ErrServerStopped {
			t.Errorf("serve: %v", err)
		}
	})
	return conn
}

// WithToken returns ctx carrying `authorization: Bearer <token>`.
func WithToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}
