// Package grpcserver builds the gRPC server every Bulkhead service uses: one
// interceptor chain (metrics, logging, auth, validation, recovery), the
// standard health service and reflection.
package grpcserver

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"time"

	"buf.build/go/protovalidate"
	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	pvmw "github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/protovalidate"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
)

// AuthFunc checks the bearer token of a call to fullMethod and returns the
// context the handler runs with (typically carrying the caller's identity).
// It returns a status error: Unauthenticated or PermissionDenied.
type AuthFunc func(ctx context.Context, fullMethod, token string) (context.Context, error)

// Options configure New.
type Options struct {
	// Log receives one line per call that ends in an error, and panics.
	Log *slog.Logger
	// Registry receives the gRPC server metrics; nil means no metrics.
	Registry prometheus.Registerer
	// Auth authenticates every call except health checks and reflection;
	// nil means no authentication.
	Auth AuthFunc
	// MaxRecvMsgSize bounds a request message (0 keeps gRPC's 4 MiB).
	MaxRecvMsgSize int
	// Admit, when set, is asked on a call's headers, after Auth accepted
	// them (ctx is the context Auth returned), whether the server may take
	// the call on now: a service spends its memory budget here, before the
	// request is read. release is called once the call has ended; a
	// refusal is a status error (ResourceExhausted, with RetryInfo).
	Admit func(ctx context.Context, fullMethod string) (release func(), err error)
	// MaxConcurrentStreams bounds the calls one connection may have open at
	// once (0: DefaultMaxConcurrentStreams). With MaxRecvMsgSize it bounds
	// the request bytes one connection can make the server hold.
	MaxConcurrentStreams uint32
}

// DefaultMaxConcurrentStreams is the calls per connection a server allows
// unless told otherwise (gRPC's own default is unlimited).
const DefaultMaxConcurrentStreams = 64

// Server is a gRPC server with its health service.
type Server struct {
	*grpc.Server
	// Health is the standard health service; services set their status on it.
	Health  *health.Server
	metrics *grpcprom.ServerMetrics
}

// New returns a server with the shared interceptor chain, outermost first:
// metrics, logging, auth (skipping health and reflection), protovalidate,
// recovery. Register services on it, then call Ready.
func New(opts Options) (*Server, error) {
	validator, err := protovalidate.New()
	if err != nil {
		return nil, err
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var unary []grpc.UnaryServerInterceptor
	var streams []grpc.StreamServerInterceptor

	var metrics *grpcprom.ServerMetrics
	if opts.Registry != nil {
		metrics = grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram())
		if err := opts.Registry.Register(metrics); err != nil {
			return nil, err
		}
		unary = append(unary, metrics.UnaryServerInterceptor())
		streams = append(streams, metrics.StreamServerInterceptor())
	}

	logger := logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		log.Log(ctx, slog.Level(lvl), msg, fields...)
	})
	// Log finished calls only: successful calls at debug, failures by code.
	logOpts := []logging.Option{logging.WithLogOnEvents(logging.FinishCall)}
	unary = append(unary, logging.UnaryServerInterceptor(logger, logOpts...))
	streams = append(streams, logging.StreamServerInterceptor(logger, logOpts...))

	if opts.Auth != nil {
		authFn := func(ctx context.Context) (context.Context, error) {
			token, err := auth.AuthFromMD(ctx, "bearer")
			if err != nil {
				return nil, err
			}
			method, _ := grpc.Method(ctx)
			return opts.Auth(ctx, method, token)
		}
		needsAuth := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
			return !Public(c.FullMethod())
		})
		unary = append(unary, selector.UnaryServerInterceptor(auth.UnaryServerInterceptor(authFn), needsAuth))
		streams = append(streams, selector.StreamServerInterceptor(auth.StreamServerInterceptor(authFn), needsAuth))
	}

	unary = append(unary, pvmw.UnaryServerInterceptor(validator))
	streams = append(streams, pvmw.StreamServerInterceptor(validator))

	onPanic := recovery.WithRecoveryHandlerContext(func(ctx context.Context, p any) error {
		log.ErrorContext(ctx, "panic in handler", "panic", p, "stack", string(debug.Stack()))
		return status.Error(codes.Internal, "internal error")
	})
	unary = append(unary, recovery.UnaryServerInterceptor(onPanic))
	streams = append(streams, recovery.StreamServerInterceptor(onPanic))

	maxStreams := opts.MaxConcurrentStreams
	if maxStreams == 0 {
		maxStreams = DefaultMaxConcurrentStreams
	}
	serverOpts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(streams...),
		grpc.MaxConcurrentStreams(maxStreams),
		// Clients may ping at most every 10 s; one that pings faster is
		// disconnected rather than served.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	}
	if opts.Auth != nil || opts.Admit != nil {
		// The interceptor runs after gRPC has read the whole request; the
		// tap runs on the headers alone, so a caller without a valid token
		// never gets a request read, buffered or decoded.
		serverOpts = append(serverOpts, grpc.InTapHandle(tapAdmit(opts.Auth, opts.Admit)))
	}
	if opts.MaxRecvMsgSize > 0 {
		serverOpts = append(serverOpts, grpc.MaxRecvMsgSize(opts.MaxRecvMsgSize))
	}

	s := &Server{Server: grpc.NewServer(serverOpts...), Health: health.NewServer(), metrics: metrics}
	healthpb.RegisterHealthServer(s.Server, s.Health)
	reflection.Register(s.Server)
	return s, nil
}

// tapAdmit refuses, before a stream exists, a call to a non-public method
// whose bearer token authFn refuses, or that admit does not take on now.
// It runs in the connection's reader goroutine, so both must be quick (a
// map lookup, constant-time compares, a semaphore's TryAcquire).
func tapAdmit(authFn AuthFunc, admit func(context.Context, string) (func(), error)) tap.ServerInHandle {
	return func(ctx context.Context, info *tap.Info) (context.Context, error) {
		if Public(info.FullMethodName) {
			return ctx, nil
		}
		authed := ctx
		if authFn != nil {
			var header string
			if v := info.Header.Get("authorization"); len(v) > 0 {
				header = v[0] // the one the auth interceptor reads
			}
			scheme, token, _ := strings.Cut(header, " ")
			if !strings.EqualFold(scheme, "bearer") || token == "" {
				return nil, status.Error(codes.Unauthenticated, "missing bearer token")
			}
			var err error
			if authed, err = authFn(ctx, info.FullMethodName, token); err != nil {
				return nil, err
			}
		}
		if admit != nil {
			release, err := admit(authed, info.FullMethodName)
			if err != nil {
				return nil, err
			}
			// ctx is the stream's: gRPC cancels it when the call ends,
			// however it ends.
			context.AfterFunc(ctx, release)
		}
		return ctx, nil
	}
}

// Ready initialises per-method metrics (so dashboards show zeros, not gaps)
// and marks every registered service SERVING. Call it after registering.
func (s *Server) Ready() {
	if s.metrics != nil {
		s.metrics.InitializeMetrics(s.Server)
	}
	for name := range s.GetServiceInfo() {
		s.Health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	s.Health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
}

// SetServing marks every registered service, and the server as a whole,
// SERVING or NOT_SERVING: the health a load balancer or probe reads.
func (s *Server) SetServing(serving bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	for name := range s.GetServiceInfo() {
		s.Health.SetServingStatus(name, st)
	}
	s.Health.SetServingStatus("", st)
}

// Public reports whether fullMethod is served without authentication: the
// health service and reflection, so probes and grpcurl work without tokens.
func Public(fullMethod string) bool {
	return strings.HasPrefix(fullMethod, "/grpc.health.v1.Health/") ||
		strings.HasPrefix(fullMethod, "/grpc.reflection.")
}

// Shutdown marks the server NOT_SERVING, then stops it gracefully, forcing
// the stop when ctx ends first. In-flight calls finish within that bound.
func (s *Server) Shutdown(ctx context.Context) {
	s.Health.Shutdown()
	done := make(chan struct{})
	go func() {
		s.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.Stop()
		<-done
	}
}

// InvalidArgument is the status for a request field that protovalidate
// cannot judge (a limit in bytes, a URL policy): InvalidArgument with a
// BadRequest field violation, so clients can point at the field.
func InvalidArgument(field, desc string) error {
	st := status.New(codes.InvalidArgument, field+": "+desc)
	st, _ = st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: field, Description: desc}}})
	return st.Err()
}

// WaitServing polls the standard health service at addr until it answers
// SERVING (the server is up and Ready was called) or ctx ends.
func WaitServing(ctx context.Context, addr string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := hc.Check(cctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not serving: %w (last: %v)", addr, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
