// Package makerun checks that the README's run command works: `make run`
// starts the whole system, which accepts impressions on its public gRPC port
// and delivers them, and stops cleanly on Ctrl-C.
package makerun

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestMakeRunServesAndDelivers(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the dev stack")
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make not installed")
	}
	ingestAddr, adminAddr := freeAddr(t), freeAddr(t)
	_, natsPort, _ := net.SplitHostPort(freeAddr(t))
	cmd := exec.Command("make", "-C", "../..", "run")
	// The defaults of `make run`, moved to free ports so a developer's own
	// `make run` does not collide with the test.
	cmd.Env = append(os.Environ(),
		"BULKHEAD_DEV_DATA_DIR="+t.TempDir(),
		"BULKHEAD_DEV_NATS_PORT="+natsPort,
		"BULKHEAD_INGEST_GRPC_ADDR="+ingestAddr,
		"BULKHEAD_MONITOR_ADMIN_ADDR="+adminAddr,
		"BULKHEAD_INGEST_METRICS_ADDR=", "BULKHEAD_ROUTER_METRICS_ADDR=",
		"BULKHEAD_DELIVERER_METRICS_ADDR=", "BULKHEAD_MONITOR_METRICS_ADDR=",
	)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // Ctrl-C goes to the whole group
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var logs []string
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			mu.Lock()
			logs = append(logs, sc.Text())
			mu.Unlock()
		}
	}()
	logged := func(s string) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, l := range logs {
			if strings.Contains(l, s) {
				return true
			}
		}
		return false
	}
	exited := make(chan error, 1)
	go func() {
		<-scanned
		exited <- cmd.Wait()
	}()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})

	// Building may take a while on a cold cache.
	poll.CheckFor(t, 5*time.Minute, 200*time.Millisecond, func() error {
		if !logged(`"bulkhead is up"`) {
			return fmt.Errorf("not up yet")
		}
		return nil
	})

	s := &stack.Stack{IngestAddr: ingestAddr, AdminAddrs: []string{adminAddr}}
	defer s.CloseClients()
	adm, err := s.AdminClient(0)
	if err != nil {
		t.Fatal(err)
	}
	ing, err := s.IngestClient()
	if err != nil {
		t.Fatal(err)
	}
	r := stack.NewReceiver()
	t.Cleanup(r.Close)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	created, err := adm.CreateDestination(stack.WithToken(ctx, "dev-admin"), &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
		Id: "readme", TenantId: "demo", Url: r.URL(), Enabled: true, Linger: durationpb.New(20 * time.Millisecond)}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.SetSecret(created.GetDestination().GetSecret()); err != nil {
		t.Fatal(err)
	}
	if _, err := ing.Submit(stack.WithToken(ctx, "dev-key"), &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{
		{Key: "user-1", Split: "new_checkout", Treatment: "on", Time: 1700000000000}}}); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, time.Minute, 100*time.Millisecond, func() error {
		if r.Snapshot().Keys["user-1"] == 0 {
			return fmt.Errorf("not delivered yet")
		}
		return nil
	})
	if snap := r.Snapshot(); snap.BadSignatures != 0 {
		t.Errorf("%d bad signatures", snap.BadSignatures)
	}

	// Ctrl-C: a graceful stop, NATS last.
	stopped = true
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		// make reports the interrupted recipe; what matters is the stack's own log.
		_ = err
	case <-time.After(60 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		t.Fatal("make run did not stop within 60s of Ctrl-C")
	}
	for _, want := range []string{`"services stopped"`, `"nats stopped"`} {
		if !logged(want) {
			t.Errorf("no %s in the log after Ctrl-C", want)
		}
	}
}
