/* One-core harness for the fp32-FMA products of one ISA build (bf16, int8,
 * int4 weights; issue 18): times one NT or NN call, with the weights rotated
 * over `copies` buffers so that they come cold from memory, and prints the
 * best and mean times, the weight GB/s and a hash of C (the bits, to compare
 * builds).
 *
 *   I=ktsft/_kernels; gcc -O3 -std=gnu11 -fno-math-errno -mavx2 -mfma -mf16c \
 *     -I$I/include -I$I/src -DSRC="\"$PWD/$I/src/kernels_avx2.c\"" \
 *     -DENTRY=ktsft_kernels_avx2 bench/fma_gemm.c -o /tmp/fma_gemm
 *   /tmp/fma_gemm NN WK M N K [reps [copies]]
 *
 * NN: 1 = NN (C[M, N] = A[M, K] W[K, N]), 0 = NT (C = A W^T, W[N, K]); WK: the
 * weight kind, 1 bf16 (bf16 A), 2 int8, 3 int4 (group 128; fp32 A).  Both with
 * a rank-16 fp32 LoRA term.  Qwen3-30B-A3B, one token per expert: gate NT
 * 1 768 2048, dx NN 1 2048 768. */
#define _GNU_SOURCE
#include <stdio.h>
#include <time.h>
#include SRC
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static uint64_t hsh(const float*c,int64_t n){uint64_t h=1469598103934665603ull;for(int64_t i=0;i<n;++i){uint32_t u;memcpy(&u,c+i,4);h=(h^u)*1099511628211ull;}return h;}
int main(int argc,char**argv){
  int nn=atoi(argv[1]), wk=atoi(argv[2]); int64_t M=atol(argv[3]),N=atol(argv[4]),K=atol(argv[5]); int reps=argc>6?atoi(argv[6]):20;
  int64_t r=16; int nw=argc>7?atoi(argv[7]):40;
  int64_t wrows = nn? K : N, wcols = nn? N : K;
  size_t wel=(size_t)wrows*wcols; size_t wb = wk==1? wel*2 : wk==2? wel : wel/2;
  uint8_t *W=aligned_alloc(64,wb*nw); for(size_t i=0;i<wb*nw;++i) W[i]=(uint8_t)(i*7%61+100);
  if(wk==1) for(size_t i=0;i<wel*nw;++i) ((uint16_t*)W)[i]=0x3f80+(i*7%61)-30;
  int64_t group=128; int64_t sld = wk==3? wcols/group : 1; /* scales: per weight row (NT row / NN row o) */
  /* NT: rows N, groups over K. NN: W[K][N] rows o, groups over n columns */
  size_t nsc = (size_t)wrows*sld; float *S=aligned_alloc(64,nsc*4*nw+64); for(size_t i=0;i<nsc*nw;++i)S[i]=0.001f*(1+i%13);
  size_t ael=(size_t)M*K; void *A=aligned_alloc(64,ael*4*nw+64);
  if(wk==1) for(size_t i=0;i<ael*nw;++i)((uint16_t*)A)[i]=0x3f00+(i*13%37); else for(size_t i=0;i<ael*nw;++i)((float*)A)[i]=0.1f*(i%11)-0.5f;
  float *A2=aligned_alloc(64,M*r*4); for(int64_t i=0;i<M*r;++i)A2[i]=0.01f*(i%7);
  float *W2=aligned_alloc(64,(nn? r*N : N*r)*4+64); for(int64_t i=0;i<(nn?r*N:N*r);++i)W2[i]=0.02f*(i%5);
  float *C=aligned_alloc(64,M*N*4+64); memset(C,0,M*N*4);
  const ktsft_kernels *kt=ENTRY();
  ktsft_gemm g={0}; g.M=M;g.N=N;g.K=K;g.lda=K;g.ldw=wcols;g.K2=r;g.A2=A2;g.lda2=r;g.W2=W2;g.ldw2=nn?N:r;g.C=C;g.ldc=N;
  g.group = wk==3? group : wcols; g.sld = sld;
  double best=1e9,tot=0; size_t asz = wk==1? ael*2: ael*4;
  for(int i=0;i<reps+2;++i){ int c=i%nw; g.W=W+(size_t)c*wb; g.A=(char*)A+(size_t)c*asz; g.wscale=S+(size_t)c*nsc; double t=now(); (nn?kt->nn[wk]:kt->nt[wk])(&g); t=now()-t; if(i>=2){tot+=t; if(t<best)best=t;} }
  g.W=W; g.A=A; g.wscale=S; (nn?kt->nn[wk]:kt->nt[wk])(&g);
  double mean=tot/reps;
  printf("%s wk=%d M=%ld N=%ld K=%ld best %.3f mean %.3f ms  %.1f GB/s(mean) hash %016lx\n",nn?"NN":"NT",wk,M,N,K,best*1e3,mean*1e3,wb/mean*1e-9,hsh(C,M*N));
}
