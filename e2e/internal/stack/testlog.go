package stack

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
)

// keptLogLines is how much of the services' log a failed test prints.
const keptLogLines = 300

// TestLogger returns a logger for the services under test. Their log is
// kept and, if the test fails, its last lines are printed with the failure,
// so a red CI run shows what the services were doing. With
// BULKHEAD_TEST_LOG set it also goes to stderr as it happens.
func TestLogger(t testing.TB) *slog.Logger { return TestLoggerAt(t, slog.LevelInfo) }

// TestLoggerAt is TestLogger keeping only records at level or above, for
// long tests whose info lines would push the interesting ones out.
func TestLoggerAt(t testing.TB, level slog.Level) *slog.Logger {
	b := &lockedBuffer{}
	var w io.Writer = b
	if os.Getenv("BULKHEAD_TEST_LOG") != "" {
		w = io.MultiWriter(b, os.Stderr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("services' log (last %d lines):\n%s", keptLogLines, b.tail(keptLogLines))
		}
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	lines := strings.Split(strings.TrimRight(b.buf.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// StartT starts a stack for a test, stops it when the test ends, and
// returns it with an IngestService client and an AdminService client of the
// first monitor; any failure fails the test.
func StartT(t testing.TB, opts Options) (*Stack, ingestv1.IngestServiceClient, adminv1.AdminServiceClient) {
	t.Helper()
	s, err := Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	ing, err := s.IngestClient()
	if err != nil {
		t.Fatal(err)
	}
	adm, err := s.AdminClient(0)
	if err != nil {
		t.Fatal(err)
	}
	return s, ing, adm
}
